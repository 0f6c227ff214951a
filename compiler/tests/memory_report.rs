//! `cleave train --memory-report` charges the optimizer's state to the device that owns the
//! gradients: none for SGD, one copy of the owned parameters for momentum, two for AdamW.

mod common;

/// The report's rows: device, params, grads, updated, optimizer, workspace, scratch, boundary,
/// saved, planned, measured.
fn report(optimizer: &str) -> Vec<Vec<u64>> {
    let root = common::root();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cleave"))
        .current_dir(&root)
        .args([
            "train",
            "examples/gpt-tiny.cir",
            "--data",
            "examples/data/modadd.safetensors",
            "--steps",
            "1",
            "--stages",
            "2",
            "--microbatches",
            "2",
            "--quiet",
            "--memory-report",
            "--optimizer",
            optimizer,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let header = err
        .lines()
        .find(|l| l.starts_with("device "))
        .unwrap_or_else(|| panic!("no report: {err}"));
    assert!(header.contains(" optimizer "), "{header}");
    common::memory_report_rows(&err)
}

#[test]
fn the_optimizer_state_is_charged_to_its_device() {
    for (optimizer, copies) in [("sgd", 0), ("momentum", 1), ("adamw", 2)] {
        let rows = report(optimizer);
        assert_eq!(rows.len(), 2, "{optimizer}: {rows:?}");
        for row in &rows {
            let (updated, state, planned) = (row[3], row[4], row[9]);
            assert!(updated > 0, "{optimizer}: {row:?}");
            assert_eq!(state, copies * updated, "{optimizer}: {row:?}");
            let sum: u64 = row[1..9].iter().sum();
            assert_eq!(
                planned, sum,
                "{optimizer}: the planned total is the sum: {row:?}"
            );
        }
    }
}
