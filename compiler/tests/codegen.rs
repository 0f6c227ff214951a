//! `--codegen`: the Cranelift and LLVM code paths compute the same bits.
//!
//! With the `llvm` feature: every bundled example's training step (AdamW, `cleave bench`'s
//! inputs) run for a few carried steps gives bit-identical outputs under both code generators;
//! `cleave train` on the examples with data writes the same losses and the same checkpoint bytes;
//! a pipelined GPT-tiny run gives the same losses and weights. Without it, `--codegen llvm` is
//! refused with the rebuild it needs.

mod common;

use cleave_compiler::train::{train, TrainArgs};
use cleave_runtime::Codegen;

#[cfg(not(feature = "llvm"))]
#[test]
fn llvm_without_the_feature_names_the_rebuild() {
    let e = train(&TrainArgs {
        codegen: Codegen::Llvm,
        ..common::args(2)
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--codegen llvm")
            && e.contains("--features llvm")
            && e.contains("scripts/install-llvm.sh"),
        "{e}"
    );
}

#[cfg(feature = "llvm")]
mod llvm {
    use super::*;
    use cleave_compiler::train::{bench_inputs, build_step_with, set_host, OptimizerArg};
    use cleave_passes::autodiff::methods::GradMethod;
    use cleave_runtime::{compile_with, host_from_tensor, CompileOptions, HostData};
    use std::collections::BTreeMap;

    const EXAMPLES: [&str; 5] = [
        "mlp.cir",
        "mlp-digits.cir",
        "gpt-block.cir",
        "gpt-tiny.cir",
        "cnn-tiny.cir",
    ];

    /// Every output of `steps` carried AdamW steps of `model` on `cleave bench`'s inputs, as
    /// bits, and the number of loops the code generator compiled.
    fn step_outputs(model: &str, codegen: Codegen, steps: usize) -> (Vec<Vec<u32>>, usize) {
        let built = build_step_with(
            &common::root().join("examples").join(model),
            None,
            (None, None, None),
            OptimizerArg::Adamw,
            1e-3,
            &GradMethod::Bp,
        )
        .unwrap();
        let mut plan = compile_with(
            &built.step,
            &CompileOptions {
                codegen,
                ..CompileOptions::default()
            },
        )
        .unwrap();
        assert_eq!(plan.codegen(), Some(codegen));
        let args = bench_inputs(&built);
        let host: Vec<HostData> = plan
            .args()
            .iter()
            .map(|a| host_from_tensor(&args[&a.name]).unwrap())
            .collect();
        for (i, h) in host.iter().enumerate() {
            set_host(&mut plan, i, h).unwrap();
        }
        let mut outs = Vec::new();
        for _ in 0..steps {
            plan.run().unwrap();
            for j in 0..plan.outputs().len() {
                outs.push(common::bits(&plan.output(j)));
            }
            plan.carry();
            // The data inputs again (a run consumes them; the state is carried).
            for (i, a) in plan.args().to_vec().iter().enumerate() {
                if a.role == cleave_ir::ArgRole::Data && !a.name.starts_with("opt.") {
                    set_host(&mut plan, i, &host[i]).unwrap();
                }
            }
        }
        (outs, plan.jit_kernels())
    }

    #[test]
    fn every_bundled_example_steps_to_the_same_bits() {
        for model in EXAMPLES {
            let (want, crane) = step_outputs(model, Codegen::Cranelift, 3);
            let (have, llvm) = step_outputs(model, Codegen::Llvm, 3);
            assert!(llvm >= crane && llvm > 0, "{model}: {llvm} LLVM loops");
            assert_eq!(want.len(), have.len(), "{model}");
            for (i, (w, h)) in want.iter().zip(&have).enumerate() {
                let diff = w.iter().zip(h).filter(|(a, b)| a != b).count();
                assert_eq!(diff, 0, "{model}: output {i}: {diff} elements differ");
            }
        }
    }

    /// A safetensors file's header entries (metadata included) and each tensor's bytes, by name.
    fn tensors(bytes: &[u8]) -> BTreeMap<String, (serde_json::Value, Vec<u8>)> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        header
            .into_iter()
            .map(|(k, v)| {
                let raw = match v["data_offsets"].as_array() {
                    Some(o) => {
                        let (a, b) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
                        data[a as usize..b as usize].to_vec()
                    }
                    None => Vec::new(),
                };
                (k, (v, raw))
            })
            .collect()
    }

    /// `cleave train` under `codegen`: the losses of the metrics file and the checkpoint's
    /// tensors.
    #[allow(clippy::type_complexity)]
    fn trained(
        args: &TrainArgs,
        codegen: Codegen,
        name: &str,
    ) -> (Vec<String>, BTreeMap<String, (serde_json::Value, Vec<u8>)>) {
        let dir = common::tmp(&format!("codegen-{name}-{codegen}"));
        let steps = args.steps;
        train(&TrainArgs {
            codegen,
            metrics: Some(dir.join("metrics.jsonl")),
            checkpoint: Some(dir.join("ckpt")),
            checkpoint_every: steps,
            ..args.clone()
        })
        .unwrap();
        let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let losses = metrics
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                Some(v.get("loss")?.to_string())
            })
            .collect();
        let ckpt = tensors(&std::fs::read(dir.join("ckpt/checkpoint.safetensors")).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        (losses, ckpt)
    }

    #[test]
    fn cleave_train_writes_the_same_losses_and_checkpoint() {
        let root = common::root();
        let runs = [
            ("digits", common::args(40)),
            (
                "cnn",
                TrainArgs {
                    model: root.join("examples/cnn-tiny.cir"),
                    data: root.join("examples/data/digits-images.safetensors"),
                    ..common::args(10)
                },
            ),
            (
                "gpt",
                TrainArgs {
                    model: root.join("examples/gpt-tiny.cir"),
                    data: root.join("examples/data/modadd.safetensors"),
                    ..common::args(10)
                },
            ),
        ];
        for (name, args) in runs {
            let (lw, cw) = trained(&args, Codegen::Cranelift, name);
            let (lh, ch) = trained(&args, Codegen::Llvm, name);
            assert_eq!(lw.len(), args.steps, "{name}: {lw:?}");
            assert_eq!(lw, lh, "{name}: losses");
            assert!(cw.len() > 2, "{name}: {:?}", cw.keys());
            for (k, w) in &cw {
                assert!(
                    ch.get(k) == Some(w),
                    "{name}: checkpoint entry `{k}` differs"
                );
            }
            assert_eq!(cw.len(), ch.len(), "{name}");
        }
    }

    #[test]
    fn a_pipelined_run_is_the_same_under_both() {
        let run = |codegen| {
            cleave_compiler::pipeline_train::train(&TrainArgs {
                codegen,
                ..common::gpt_tiny(2, "zb-h1", 4)
            })
            .unwrap()
        };
        common::assert_same(
            "gpt-tiny, 2 stages, zb-h1",
            &run(Codegen::Cranelift),
            &run(Codegen::Llvm),
        );
    }
}
