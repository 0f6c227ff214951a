//! Pipeline stages as processes over MPI (the `mpi` feature; `scripts/install-mpi.sh`):
//! `mpirun -np P cleave train … --stages P` gives the losses and the final weights (read from the
//! checkpoint rank 0 writes) of the same run with one thread per device, bit for bit, for every
//! schedule family: 1F1B, ZB-H1, ZB-H2, ZB-V, interleaved, BitPipe and the
//! joint plan, on GPT-tiny, the digits MLP and the digits CNN (8×8 images).
#![cfg(feature = "mpi")]

mod common;

use cleave_compiler::pipeline_train::train;
use cleave_compiler::train::{OptimizerArg, TrainArgs};
use common::root;

/// The `loss` of every step and the final `eval_loss` of a metrics file, as written (the text
/// of each number: JSON parsing need not round-trip, the text does).
fn metrics(path: &std::path::Path) -> (Vec<String>, Option<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut losses = Vec::new();
    let mut eval = None;
    let field = |line: &str, key: &str| -> Option<String> {
        let rest = line.split(&format!("\"{key}\":")).nth(1)?;
        Some(rest.split([',', '}']).next()?.to_string())
    };
    for line in text.lines() {
        if let Some(l) = field(line, "loss") {
            losses.push(l);
        }
        if let Some(l) = field(line, "eval_loss") {
            eval = Some(l);
        }
    }
    (losses, eval)
}

/// Runs `mpirun ARGS` from the repository root (as root too, more ranks than cores allowed).
fn mpirun<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    std::process::Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe"])
        .args(args)
        .current_dir(root())
        .output()
        .expect("mpirun (scripts/install-mpi.sh)")
}

fn check(model: (&str, &str), p: usize, m: usize, schedule: &[&str]) {
    let stem = std::path::Path::new(model.0)
        .file_stem()
        .unwrap()
        .to_string_lossy();
    let dir = common::tmp(&format!(
        "mpi-{stem}-{p}-{}",
        schedule.join("-").replace('/', "_")
    ));
    let threads = dir.join("threads.jsonl");
    let procs = dir.join("procs.jsonl");
    let (name, limit, method, clip) = match schedule {
        [s, "--memory-limit", l] => (*s, Some(l.to_string()), "bp", None),
        [s, "--grad-method", g] => (*s, None, *g, None),
        [s, "--grad-clip", c] => (*s, None, "bp", Some(c.parse().unwrap())),
        [s, "--optimizer", _] | [s] | [s, "--executor", _] => (*s, None, "bp", None),
        _ => unreachable!(),
    };
    let (optimizer, opt_name) = match schedule {
        [_, "--optimizer", "adamw"] => (OptimizerArg::Adamw, "adamw"),
        [_, "--optimizer", "momentum"] => (OptimizerArg::Momentum, "momentum"),
        _ => (OptimizerArg::Sgd, "sgd"),
    };
    let schedule = match schedule {
        [s, "--optimizer", _] => std::slice::from_ref(s),
        _ => schedule,
    };
    let args = TrainArgs {
        model: root().join(model.0),
        data: root().join(model.1),
        optimizer,
        seed: Some(1),
        stages: p,
        microbatches: m,
        schedule: name.into(),
        memory_limit: limit,
        grad_method: method.into(),
        grad_clip: clip,
        metrics: Some(threads.clone()),
        ..common::args(3)
    };
    let run = train(&args).unwrap_or_else(|e| panic!("{name} threads: {e:#}"));
    assert_eq!(run.losses.len(), 3);
    let np = p.to_string();
    let (ms, steps) = (m.to_string(), "3".to_string());
    let ckpt = dir.join("ckpt");
    let mut cmd = vec![
        "-np",
        &np,
        env!("CARGO_BIN_EXE_cleave"),
        "train",
        model.0,
        "--data",
        model.1,
        "--optimizer",
        opt_name,
        "--seed",
        "1",
        "--steps",
        &steps,
        "--stages",
        &np,
        "--microbatches",
        &ms,
        "--quiet",
        "--metrics",
        procs.to_str().unwrap(),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--schedule",
    ];
    cmd.extend_from_slice(schedule);
    let o = mpirun(&cmd);
    assert!(
        o.status.success(),
        "{name} -np {p}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let (a, ea) = metrics(&threads);
    let (b, eb) = metrics(&procs);
    assert_eq!(a.len(), 3, "{name}: {a:?}");
    assert!(ea.is_some(), "{name}: no held-out loss in the metrics");
    assert_eq!(b, a, "{name} -np {p}: losses of processes vs threads");
    assert_eq!(eb, ea, "{name} -np {p}: held-out loss of the final weights");
    // The final weights, from the checkpoint rank 0 wrote after the last step, bit for bit.
    let (tensors, _) = cleave_compiler::train::read_checkpoint(&ckpt).unwrap();
    for (k, want) in &run.params {
        let cleave_runtime::HostData::F32(w) = want else {
            continue;
        };
        let have = tensors[k].to_f32_vec();
        let same =
            have.len() == w.len() && have.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "{name} -np {p}: final `{k}` differs from the threads'"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const GPT: (&str, &str) = ("examples/gpt-tiny.cir", "examples/data/modadd.safetensors");
const MLP: (&str, &str) = (
    "examples/mlp-digits.cir",
    "examples/data/digits.safetensors",
);

#[test]
fn two_processes_match_two_threads_for_every_schedule() {
    for s in [
        &["1f1b"][..],
        &["zb-h1"],
        &["zb-h2"],
        &["zb-v"],
        &["interleaved"],
        &["bitpipe"],
        &["auto", "--memory-limit", "6M"],
    ] {
        check(GPT, 2, 4, s);
    }
}

/// Gradient methods on processes: DFA (the output error sent from the last rank to every
/// other), forward gradients (the directional derivative sent the same way) and local learning (no gradient crosses ranks) match threads bit for bit; so do
/// `--grad-clip` (every rank validates the step with the all-gathered gradients) and AdamW
/// (every rank runs the update on the all-gathered gradients).
#[test]
fn two_processes_run_the_gradient_methods() {
    for s in [
        &["zb-h1", "--grad-method", "dfa"][..],
        &["1f1b", "--grad-method", "fa"],
        &["zb-h1", "--grad-method", "local"],
        &["zb-h1", "--grad-method", "forward-gradient"],
        &["zb-v", "--grad-clip", "0.05"],
        &["zb-h1", "--optimizer", "adamw"],
    ] {
        check(GPT, 2, 4, s);
    }
}

const CNN: (&str, &str) = (
    "examples/cnn-tiny.cir",
    "examples/data/digits-images.safetensors",
);

#[test]
fn two_processes_train_the_cnn_for_every_schedule() {
    for s in [
        &["1f1b"][..],
        &["zb-h1"],
        &["zb-h2"],
        &["zb-v"],
        &["interleaved"],
    ] {
        check(CNN, 2, 4, s);
    }
}

#[test]
fn four_processes_match_four_threads() {
    for s in [
        &["1f1b"][..],
        &["zb-h1"],
        &["zb-h2"],
        &["zb-v"],
        &["interleaved"],
    ] {
        check(MLP, 4, 8, s);
    }
    for s in [&["zb-h1"][..], &["zb-v"]] {
        check(GPT, 4, 8, s);
        check(CNN, 4, 8, s);
    }
}

/// The action-list executor that `--target cuda --stages` runs, on processes
/// (`--executor list`): each rank runs its device's list, values go through the transport
/// interface (host tensors over MPI here, NCCL on GPUs); bit for bit the thread pipeline's losses
/// and weights.
#[test]
fn the_list_executor_on_processes_matches_threads() {
    check(GPT, 2, 4, &["zb-h1", "--executor", "list"]);
    check(GPT, 2, 4, &["zb-v", "--executor", "list"]);
    check(MLP, 4, 8, &["1f1b", "--executor", "list"]);
}

/// `-np NP cleave train` on GPT-tiny over 2 stages, quiet, with `extra` flags.
fn gpt_ranks<'a>(np: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "-np",
        np,
        env!("CARGO_BIN_EXE_cleave"),
        "train",
        GPT.0,
        "--data",
        GPT.1,
        "--stages",
        "2",
        "--quiet",
    ];
    v.extend_from_slice(extra);
    v
}

/// A rank whose action fails ends every rank at once (MPI_Abort after its message), naming the
/// rank, the stage and the action; nothing waits for the receive timeout.
#[test]
fn a_failing_rank_ends_the_job_naming_the_action() {
    let started = std::time::Instant::now();
    let o = mpirun(gpt_ranks(
        "2",
        &[
            "--microbatches",
            "4",
            "--steps",
            "3",
            "--schedule",
            "1f1b",
            "--fail-action",
            "1BW2",
        ],
    ));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rank 1") && err.contains("stage 1") && err.contains("1BW2"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// Ranks launched with different flags (here `--steps`) refuse to start, every one of them,
/// with one message; so does a rank count other than `--stages`.
#[test]
fn mismatched_launches_are_refused_by_every_rank() {
    let mut args = gpt_ranks("1", &["--microbatches", "4", "--steps", "3"]);
    args.push(":");
    args.extend(gpt_ranks("1", &["--microbatches", "4", "--steps", "4"]));
    let o = mpirun(args);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the plan of rank"), "{err}");
    let o = mpirun(gpt_ranks("3", &["--steps", "1"]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("launched as 3 MPI processes for --stages 2"),
        "{err}"
    );
}

/// [`gpt_ranks`] on 2 ranks: SGD, seed 1, 4 microbatches under `schedule` for `steps` steps,
/// checkpoints in `ckpt`, then `extra` flags.
fn gpt_checkpointed<'a>(
    schedule: &'a str,
    steps: &'a str,
    ckpt: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut flags = vec![
        "--optimizer",
        "sgd",
        "--seed",
        "1",
        "--microbatches",
        "4",
        "--schedule",
        schedule,
        "--steps",
        steps,
        "--checkpoint",
        ckpt,
    ];
    flags.extend_from_slice(extra);
    gpt_ranks("2", &flags)
}

/// A checkpoint written by a run of two processes resumes in a run with two threads, bit for
/// bit (one format).
#[test]
fn a_process_checkpoint_resumes_in_threads() {
    let dir = common::tmp("mpi-ckpt");
    let ckpt = dir.join("ckpt");
    let o = mpirun(gpt_checkpointed("zb-h1", "2", ckpt.to_str().unwrap(), &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_resumes_in_threads(&ckpt, "zb-h1", 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// GPT-tiny on two threads (SGD, seed 1, 4 microbatches, `schedule`) for `steps` steps, resumed
/// from `ckpt` (written after step 2 by processes), gives the straight run's last steps and
/// final weights bit for bit.
fn assert_resumes_in_threads(ckpt: &std::path::Path, schedule: &str, steps: usize) {
    let base = common::gpt_tiny(2, schedule, steps);
    let straight = train(&base).unwrap();
    let resumed = train(&TrainArgs {
        resume: Some(ckpt.to_path_buf()),
        ..base
    })
    .unwrap();
    assert_eq!(resumed.losses[..], straight.losses[2..]);
    for (name, w) in &straight.params {
        assert!(
            common::bits(&resumed.params[name]) == common::bits(w),
            "{name} differs after resuming"
        );
    }
}

/// A rank killed with SIGKILL mid-step: the launcher ends the job at once (naming the dead
/// rank), the other rank says where it was, nothing hangs, and the last checkpoint (written
/// before the kill) resumes in threads bit for bit.
#[test]
fn a_killed_rank_ends_the_job_and_the_checkpoint_resumes() {
    let dir = common::tmp("mpi-kill");
    let ckpt = dir.join("ckpt");
    let o = mpirun(gpt_checkpointed(
        "1f1b",
        "6",
        ckpt.to_str().unwrap(),
        &["--checkpoint-every", "2", "--kill-action", "3:1F2"],
    ));
    let ended = std::time::SystemTime::now();
    assert!(!o.status.success());
    // The kill comes after the checkpoint of step 2 was written: from then to the job's end.
    let written = std::fs::metadata(ckpt.join("checkpoint.safetensors"))
        .and_then(|m| m.modified())
        .unwrap();
    let took = ended.duration_since(written).unwrap_or_default();
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "the launcher names the killed rank: {err}"
    );
    assert!(
        err.contains("error: rank 0: ended by the MPI launcher (SIGTERM) in step 3, at stage 0"),
        "{err}"
    );
    let (_, meta) = cleave_compiler::train::read_checkpoint(&ckpt).unwrap();
    assert_eq!(meta["step"], "2");
    assert_resumes_in_threads(&ckpt, "1f1b", 6);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--memory-report` with one process per device: each rank measures its own device with the
/// instrumented allocator and rank 0 prints every device's row, measured beside planned.
#[test]
fn processes_report_every_devices_memory() {
    let o = mpirun(gpt_ranks(
        "2",
        &[
            "--microbatches",
            "4",
            "--steps",
            "2",
            "--schedule",
            "zb-h1",
            "--memory-report",
        ],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    let rows = common::memory_report_rows(&err);
    assert_eq!(rows.len(), 2, "one row per device: {err}");
    for (d, row) in rows.iter().enumerate() {
        // device, params, grads, updated, optimizer, workspace, scratch, boundary, saved,
        // planned, measured
        assert_eq!(row[0], d as u64);
        let (planned, measured) = (row[9], row[10]);
        assert!(measured > 0 && measured <= planned * 2, "device {d}: {err}");
    }
}
