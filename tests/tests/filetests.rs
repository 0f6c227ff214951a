//! File-driven tests over `tests/filetests/**/*.cir`.
//!
//! Each file starts with a header line `// test <kind>` and holds one or more cases separated by
//! lines `// -----`. Line numbers inside a case are those of the whole file, so errors point at the
//! file as a reader sees it. Kinds:
//!
//! - `roundtrip`: each case parses and verifies, and print → parse → print is the identity. The
//!   snapshot is the canonical print.
//! - `error`: each case must be rejected (by the parser or the verifier). Every `// error: TEXT`
//!   line of the case must appear in the rendered message, and the message must be located
//!   (`file:line:col: error:`). The snapshot is the rendered message.
//! - `inspect`: each case verifies; the snapshot is `cleave inspect`'s table.
//! - `pass <pipeline>` (e.g. `// test pass autodiff{mode=loss}`): each case verifies, the pipeline
//!   runs with verification after every pass, and the snapshot is the unified diff of the printed
//!   module before and after (what the passes changed), followed by the pass warnings. A case
//!   that must not be rewritten shows an empty diff. A case with `// error:` lines must make the
//!   pipeline fail with those texts instead.
//!
//! Snapshots live in `tests/tests/snapshots/`. CI runs with `CI=true`, so insta never writes them;
//! update them with `cargo insta review` or `INSTA_UPDATE=always cargo test -p cleave-tests`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cleave_compiler::load::parse_and_verify;

static FILES_RUN: AtomicUsize = AtomicUsize::new(0);

fn filetests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("filetests")
}

/// One case of a file: its text, with the other cases' lines blanked so line numbers match.
struct Case {
    text: String,
    first_line: usize,
}

fn split_cases(source: &str) -> Vec<Case> {
    let lines: Vec<&str> = source.lines().collect();
    let mut bounds = vec![0];
    for (i, l) in lines.iter().enumerate() {
        if l.trim() == "// -----" {
            bounds.push(i + 1);
        }
    }
    bounds.push(lines.len() + 1);
    bounds
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0], w[1].saturating_sub(1).min(lines.len()));
            let mut text = String::new();
            for (i, l) in lines.iter().enumerate() {
                if i >= start && i < end {
                    text.push_str(l);
                }
                text.push('\n');
            }
            Case {
                text,
                first_line: start + 1,
            }
        })
        .collect()
}

fn header(source: &str, path: &Path) -> String {
    let first = source.lines().next().unwrap_or("");
    first
        .strip_prefix("// test ")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|| panic!("{}: first line must be `// test <kind>`", path.display()))
}

fn expected_errors(case: &Case) -> Vec<String> {
    case.text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// error:"))
        .map(|s| s.trim().to_string())
        .collect()
}

fn run_file(path: &Path) -> String {
    let source = std::fs::read_to_string(path).unwrap();
    let rel = path
        .strip_prefix(filetests_dir())
        .unwrap()
        .display()
        .to_string();
    let kind = header(&source, path);
    let mut out = String::new();
    for case in split_cases(&source) {
        let result = parse_and_verify(&case.text, &rel);
        let section = match kind.as_str() {
            "roundtrip" => {
                let module = result
                    .unwrap_or_else(|e| panic!("{rel} (case at line {}): {e:#}", case.first_line));
                let printed = module.to_string();
                let reparsed = parse_and_verify(&printed, &rel).unwrap_or_else(|e| {
                    panic!("{rel}: printed text does not parse back: {e:#}\n{printed}")
                });
                assert_eq!(
                    printed,
                    reparsed.to_string(),
                    "{rel}: round trip changed the text"
                );
                printed
            }
            "error" => {
                let expected = expected_errors(&case);
                assert!(
                    !expected.is_empty(),
                    "{rel} (case at line {}): an error case needs `// error:` lines",
                    case.first_line
                );
                let err = match result {
                    Ok(_) => panic!(
                        "{rel} (case at line {}): expected an error, but the case is valid",
                        case.first_line
                    ),
                    Err(e) => format!("{e:#}"),
                };
                assert!(
                    err.lines().any(|l| {
                        l.strip_prefix(&format!("{rel}:")).is_some_and(|rest| {
                            rest.split(':')
                                .take(2)
                                .all(|n| n.trim().parse::<usize>().is_ok())
                        })
                    }),
                    "{rel}: error is not located (no `{rel}:line:col:`):\n{err}"
                );
                for want in expected {
                    assert!(
                        err.contains(&want),
                        "{rel}: error does not mention `{want}`:\n{err}"
                    );
                }
                err
            }
            "inspect" => {
                let module = result.unwrap_or_else(|e| panic!("{rel}: {e:#}"));
                cleave_compiler::inspect::render_table(&cleave_compiler::inspect::inspect(&module))
            }
            pipeline if pipeline.starts_with("pass ") => {
                let module = result.unwrap_or_else(|e| panic!("{rel}: {e:#}"));
                run_pipeline_case(&rel, &case, module, &pipeline["pass ".len()..])
            }
            other => panic!("{rel}: unknown test kind `{other}`"),
        };
        out.push_str(&format!("// ----- case at line {}\n", case.first_line));
        out.push_str(&section);
        if !section.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// Runs a pass pipeline over one case; returns the before/after diff and the warnings.
fn run_pipeline_case(
    rel: &str,
    case: &Case,
    mut module: cleave_ir::Module,
    pipeline: &str,
) -> String {
    let before = module.to_string();
    let mut pm = cleave_passes::PassManager::from_pipeline(pipeline.trim())
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    pm.verify_each = true;
    let mut ctx = cleave_passes::PassContext::default();
    let result = pm.run(&mut module, &mut ctx, &mut |_| {});
    let expected = expected_errors(case);
    if !expected.is_empty() {
        let err = match result {
            Ok(()) => panic!(
                "{rel} (case at line {}): expected the pipeline to fail",
                case.first_line
            ),
            Err(e) => e.to_string(),
        };
        for want in expected {
            assert!(
                err.contains(&want),
                "{rel}: error does not mention `{want}`:\n{err}"
            );
        }
        return format!("error: {err}\n");
    }
    result.unwrap_or_else(|e| panic!("{rel} (case at line {}): {e}", case.first_line));
    let after = module.to_string();
    let reparsed = cleave_compiler::load::parse_and_verify(&after, rel)
        .unwrap_or_else(|e| panic!("{rel}: the pass output does not parse back: {e:#}"));
    assert_eq!(
        after,
        reparsed.to_string(),
        "{rel}: pass output does not round-trip"
    );
    let diff = similar::TextDiff::from_lines(&before, &after);
    let mut out = diff
        .unified_diff()
        .context_radius(2)
        .header("before", "after")
        .to_string();
    if out.is_empty() {
        out = "(unchanged)\n".to_string();
    }
    for w in &ctx.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

#[test]
fn filetests() {
    insta::glob!("../filetests", "**/*.cir", |path| {
        FILES_RUN.fetch_add(1, Ordering::SeqCst);
        insta::assert_snapshot!(run_file(path));
    });
    // Every fixture on disk must have been picked up by the glob.
    let mut on_disk = 0;
    let mut stack = vec![filetests_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "cir") {
                on_disk += 1;
            }
        }
    }
    assert_eq!(
        FILES_RUN.load(Ordering::SeqCst),
        on_disk,
        "a fixture was not run"
    );
    assert!(
        on_disk >= 20,
        "expected the fixture set, found {on_disk} files"
    );
}

/// Tidy: every registered pass has a folder of filetests named after it.
#[test]
fn every_pass_has_filetests() {
    for info in cleave_passes::registry() {
        let dir = filetests_dir().join(info.name);
        let has_files = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "cir"))
            })
            .unwrap_or(false);
        assert!(
            has_files,
            "pass `{}` has no tests/filetests/{}/*.cir",
            info.name, info.name
        );
    }
}
