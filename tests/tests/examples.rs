//! The bundled examples: each verifies, round-trips through the text format exactly, and is what
//! `cleave new-model` generates today (the commands are read from `examples/regenerate.sh`).

use std::path::{Path, PathBuf};

use cleave_compiler::load::load_module;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `new-model` command lines of `examples/regenerate.sh`, as argument lists after `--`.
fn generator_commands() -> Vec<Vec<String>> {
    let script = std::fs::read_to_string(root().join("examples/regenerate.sh")).unwrap();
    script
        .lines()
        .filter(|l| l.contains(" new-model "))
        .map(|l| {
            let (_, args) = l
                .split_once(" -- ")
                .expect("`cargo run ... -- new-model ...`");
            args.split_whitespace().map(str::to_string).collect()
        })
        .collect()
}

#[test]
fn examples_verify_and_round_trip() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "cir") {
            let module =
                load_module(&path, &Default::default()).unwrap_or_else(|e| panic!("{e:#}"));
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(
                module.to_string(),
                text,
                "{}: not in canonical form",
                path.display()
            );
            n += 1;
        }
    }
    assert!(n >= 3, "expected mlp.cir, gpt-tiny.cir and cnn-tiny.cir");
}

#[test]
fn examples_match_the_generators() {
    let commands = generator_commands();
    assert_eq!(commands.len(), 6);
    let dir = std::env::temp_dir().join(format!("cleave-examples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for args in commands {
        let out_idx = args.iter().position(|a| a == "-o").unwrap() + 1;
        let committed = root().join(&args[out_idx]);
        let fresh = dir.join(Path::new(&args[out_idx]).file_name().unwrap());
        let mut argv = vec!["cleave".to_string()];
        argv.extend(args.iter().cloned());
        argv[out_idx + 1] = fresh.display().to_string();
        cleave_compiler::cli::main_with_args(argv).unwrap();
        let want = std::fs::read_to_string(&fresh).unwrap();
        let have = std::fs::read_to_string(&committed).unwrap();
        assert!(
            want == have,
            "{} differs from what `cleave {}` generates; run examples/regenerate.sh",
            committed.display(),
            args.join(" ")
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
