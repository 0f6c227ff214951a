//! The long-running robustness check of the ONNX reader: a million mutated or truncated copies
//! of the fixtures (`cargo bench -p cleave-compiler --bench onnx_fuzz`; `ONNX_FUZZ_CASES=N` to
//! change the count). Every copy must import or fail with an error that says something; a
//! panic aborts the run with the seed and case number. The quick version is the
//! `mutated_files_never_panic` property test.

use std::path::Path;

use cleave_compiler::onnx::{import_bytes, ImportOptions};

/// SplitMix64: a small deterministic generator, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for _ in 0..1 + rng.below(8) {
        if b.is_empty() {
            break;
        }
        let i = rng.below(b.len());
        match rng.below(5) {
            0 => b[i] = rng.next() as u8,
            1 => b[i] ^= 1 << rng.below(8),
            2 => b.insert(i, rng.next() as u8),
            3 => {
                b.remove(i);
            }
            _ => {
                // Varint-heavy edits: small integers where lengths and tags live.
                b[i] = rng.below(16) as u8;
            }
        }
    }
    if rng.below(4) == 0 {
        let cut = rng.below(b.len() + 1);
        b.truncate(cut);
    }
    b
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/onnx");
    let cases: u64 = std::env::var("ONNX_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = std::env::var("ONNX_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x000c_ea7e);
    let files: Vec<Vec<u8>> = ["mlp.onnx", "cnn.onnx", "gpt.onnx"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("fixture"))
        .collect();
    let opts = ImportOptions { batch: Some(2) };
    let mut rng = Rng(seed);
    let (mut ok, mut errors) = (0u64, 0u64);
    let start = std::time::Instant::now();
    for case in 0..cases {
        let which = rng.below(files.len());
        let bad = mutate(&mut rng, &files[which]);
        let result = std::panic::catch_unwind(|| import_bytes(&bad, Some(&dir), &opts));
        match result {
            Ok(Ok(imported)) => {
                let _ = cleave_ir::verify_module(&imported.module);
                ok += 1;
            }
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty(), "case {case}: empty error");
                errors += 1;
            }
            Err(_) => panic!("case {case} (seed {seed}) panicked"),
        }
    }
    println!(
        "onnx_fuzz: {cases} mutated files in {:.1?}: {ok} imported, {errors} rejected with an error, 0 panics",
        start.elapsed()
    );
}
