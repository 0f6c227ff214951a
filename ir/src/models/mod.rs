//! Model builders on the [`crate::tracer`]: each returns a forward [`crate::Function`].
//!
//! - [`mlp()`]: an MLP classifier; outputs `loss` and `logits`.
//! - [`cnn()`]: a small convolutional classifier; outputs `loss` and `logits`.
//! - [`gpt()`]: a decoder-only transformer language model; outputs `loss` and `logits`.
//! - [`gpt_layer()`]: one transformer layer, a pipeline stage body; output `y` (no loss).
//!
//! `loss` is always a scalar: the mean of the per-example (per-position) cross-entropy.

pub mod cnn;
pub mod gpt;
pub mod mlp;

pub use cnn::{cnn, CnnConfig};
pub use gpt::{gpt, gpt_layer, GptConfig, GptLayerConfig, MlpAct, Norm};
pub use mlp::{mlp, MlpConfig};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::op::{PoolKind, UnaryOp};
    use crate::types::DType;
    use crate::{infer, Function, Value};
    use std::collections::HashSet;

    /// Checks that `body` is topologically ordered and every node's declared result types are
    /// exactly what `infer` gives for its op and operands, and that outputs are defined.
    pub(crate) fn check_types(func: &Function) {
        let mut defined: HashSet<Value> = HashSet::new();
        for &node in &func.body {
            let data = &func.nodes[node];
            for &v in &data.operands {
                assert!(
                    defined.contains(&v),
                    "{node}: operand {v} used before definition"
                );
            }
            let operand_types: Vec<_> = data.operands.iter().map(|&v| func.ty(v)).collect();
            let inferred = infer(&data.op, &operand_types)
                .unwrap_or_else(|e| panic!("{node} ({}): {e}", data.op.name()));
            let declared: Vec<_> = data.results.iter().map(|&v| func.ty(v).clone()).collect();
            assert_eq!(inferred, declared, "{node} ({})", data.op.name());
            for (i, &v) in data.results.iter().enumerate() {
                assert_eq!(func.values[v].def, node);
                assert_eq!(func.values[v].result_index as usize, i);
                defined.insert(v);
            }
        }
        for o in &func.outputs {
            assert!(defined.contains(&o.value), "output {} undefined", o.name);
        }
    }

    /// `check_types`, printing, and the loss/logits outputs of a classifier.
    fn check_classifier(func: &Function, logits_shape: &[usize]) {
        check_types(func);
        let text = format!("{func}");
        assert!(text.contains("as \"loss\""), "{text}");
        let loss = func.output("loss").expect("loss output");
        assert_eq!(func.ty(loss).shape, Vec::<usize>::new());
        let logits = func.output("logits").expect("logits output");
        assert_eq!(func.ty(logits).shape, logits_shape);
    }

    fn param_count(func: &Function) -> usize {
        func.params().map(|p| p.ty.num_elements()).sum()
    }

    pub(crate) fn all_models() -> Vec<Function> {
        let mut out = vec![
            mlp(&MlpConfig::default()).unwrap(),
            mlp(&MlpConfig {
                activation: UnaryOp::Tanh,
                bias: false,
                sizes: vec![5, 3],
                batch: 2,
                dtype: DType::F64,
            })
            .unwrap(),
            cnn(&CnnConfig::default()).unwrap(),
            cnn(&CnnConfig {
                second_pool: PoolKind::Max,
                image_hw: [9, 7],
                in_channels: 3,
                ..CnnConfig::default()
            })
            .unwrap(),
            gpt(&GptConfig::default()).unwrap(),
            gpt_layer(&GptLayerConfig::default()).unwrap(),
            gpt_layer(&GptLayerConfig::table1()).unwrap(),
        ];
        for norm in [Norm::LayerNorm, Norm::RmsNorm] {
            for mlp_act in [MlpAct::Gelu, MlpAct::Silu] {
                for tied in [false, true] {
                    out.push(
                        gpt(&GptConfig {
                            norm,
                            mlp_act,
                            tied_embeddings: tied,
                            bias: !tied,
                            dtype: if tied { DType::BF16 } else { DType::F32 },
                            ..GptConfig::default()
                        })
                        .unwrap(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn every_model_is_well_typed_and_prints() {
        for f in all_models() {
            check_types(&f);
            let text = format!("{f}");
            assert!(text.starts_with(&format!("func @{} {{", f.name)));
        }
    }

    #[test]
    fn mlp_shapes_and_params() {
        let f = mlp(&MlpConfig::default()).unwrap();
        check_classifier(&f, &[64, 10]);
        assert_eq!(
            param_count(&f),
            784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
        );
        assert_eq!(param_count(&f), 269_322);
        let names: Vec<&str> = f.params().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
                "fc3.weight",
                "fc3.bias"
            ]
        );
        let inputs: Vec<String> = f
            .data_inputs()
            .map(|a| format!("{} {}", a.name, a.ty))
            .collect();
        assert_eq!(inputs, ["x f32[64,784]", "labels i32[64]"]);
        let relus = f
            .body
            .iter()
            .filter(|&&n| f.nodes[n].op.name() == "relu")
            .count();
        assert_eq!(relus, 2);
    }

    #[test]
    fn cnn_shapes() {
        let f = cnn(&CnnConfig::default()).unwrap();
        check_classifier(&f, &[8, 10]);
        // conv1 8·1·9+8, conv2 16·8·9+16, fc 16·7·7·10+10.
        assert_eq!(param_count(&f), 80 + 1168 + 7850);
        let g = cnn(&CnnConfig {
            second_pool: PoolKind::Max,
            image_hw: [9, 7],
            in_channels: 3,
            ..CnnConfig::default()
        })
        .unwrap();
        check_classifier(&g, &[8, 10]);
        // 9x7 -> pool 4x3 -> pool 2x1: fc has 16·2·1 inputs.
        let fc = g.params().find(|p| p.name == "fc.weight").unwrap();
        assert_eq!(fc.ty.shape, [32, 10]);
    }

    #[test]
    fn small_gpt_param_counts_by_hand() {
        let cfg = GptConfig {
            vocab: 16,
            d_model: 8,
            heads: 2,
            layers: 2,
            seq: 4,
            batch: 2,
            ..GptConfig::default()
        };
        let f = gpt(&cfg).unwrap();
        check_classifier(&f, &[2, 4, 16]);
        // wte 16·8 = 128, wpe 4·8 = 32; per layer: ln1 16, wq/wk/wv/wo 4·(64+8) = 288, ln2 16,
        // mlp.fc 8·32+32 = 288, mlp.proj 32·8+8 = 264 → 872; ln_f 16.
        assert_eq!(param_count(&f), 128 + 32 + 2 * 872 + 16);
        assert_eq!(param_count(&f), 1920);
        let untied = gpt(&GptConfig {
            tied_embeddings: false,
            ..cfg.clone()
        })
        .unwrap();
        assert_eq!(param_count(&untied), 1920 + 8 * 16);
        // RMS norm without biases: per layer ln1 8, 4·64, ln2 8, 256, 256 → 784; ln_f 8.
        let rms = gpt(&GptConfig {
            norm: Norm::RmsNorm,
            bias: false,
            ..cfg
        })
        .unwrap();
        assert_eq!(param_count(&rms), 128 + 32 + 2 * 784 + 8);
        let names: Vec<&str> = f.params().map(|p| p.name).collect();
        for want in [
            "wte",
            "wpe",
            "layers.0.ln1.weight",
            "layers.0.attn.wq.weight",
            "layers.0.attn.wo.bias",
            "layers.1.mlp.fc.weight",
            "layers.1.mlp.proj.bias",
            "layers.1.ln2.bias",
            "ln_f.weight",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn gpt_layer_interface() {
        let f = gpt_layer(&GptLayerConfig::default()).unwrap();
        check_types(&f);
        let inputs: Vec<String> = f
            .data_inputs()
            .map(|a| format!("{} {}", a.name, a.ty))
            .collect();
        assert_eq!(inputs, ["x f32[2,16,64]"]);
        assert_eq!(f.outputs.len(), 1);
        assert_eq!(f.outputs[0].name, "y");
        assert_eq!(f.ty(f.outputs[0].value).to_string(), "f32[2,16,64]");
        let names: Vec<&str> = f.params().map(|p| p.name).collect();
        assert_eq!(names.len(), 16);
        assert_eq!(names[0], "ln1.weight");
        assert!(names.contains(&"attn.wk.bias"));
        let matmuls = f
            .body
            .iter()
            .filter(|&&n| f.nodes[n].op.name() == "matmul")
            .count();
        assert_eq!(matmuls, 8);
    }

    #[test]
    fn bad_configs_are_errors() {
        let e = gpt_layer(&GptLayerConfig {
            heads: 3,
            ..GptLayerConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`gpt_layer`: heads = 3 must divide d_model = 64 (operands: f32[2,16,64])"
        );
        let e = gpt(&GptConfig {
            heads: 5,
            ..GptConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("layers.0: `gpt_layer`"), "{e}");
        let e = mlp(&MlpConfig {
            activation: UnaryOp::Not,
            ..MlpConfig::default()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`not`: does not accept element type f32 (operands: f32[64,256])"
        );
    }
}
