//! Snapshots of the MLIR the emitter writes (linalg on tensors, before any pass) for small
//! `.cir` files in `tests/emit/`. Plain Rust: runs without the `mlir` feature. Update with
//! `cargo insta review` (CI never writes snapshots).

#[test]
fn emitted_mlir() {
    insta::glob!("emit/*.cir", |path| {
        let text = std::fs::read_to_string(path).unwrap();
        let module = cleave_ir::parse_module(&text).unwrap();
        let kernels = cleave_mlir::emit_function(&module.functions[0]).unwrap();
        let funcs: Vec<&str> = kernels.iter().map(|k| k.func.as_str()).collect();
        insta::assert_snapshot!(cleave_mlir::module_text(&funcs));
    });
}

#[test]
fn every_emit_fixture_is_snapshotted() {
    // A fixture without a snapshot (or a snapshot without a fixture) fails here, so that a new
    // file cannot silently go unchecked.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut fixtures: Vec<String> = std::fs::read_dir(dir.join("emit"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cir"))
        .collect();
    let mut snaps: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("emit_snapshots__emitted_mlir@") && n.ends_with(".snap"))
        .map(|n| {
            n.trim_start_matches("emit_snapshots__emitted_mlir@")
                .trim_end_matches(".snap")
                .to_string()
        })
        .collect();
    fixtures.sort();
    snaps.sort();
    assert_eq!(fixtures, snaps);
}
