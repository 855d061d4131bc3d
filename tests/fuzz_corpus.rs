//! Replays every fuzz corpus and every input the fuzzer ever failed on
//! (`fuzz/corpus/TARGET`, `fuzz/regressions/TARGET`) through the same target
//! bodies the fuzzer runs (`rwkv_wgpu::fuzzing`), under plain `cargo test`
//! on stable: none may panic, and what the fuzzer found stays fixed.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in rwkv_wgpu::fuzzing::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} is empty: the target would be replayed on nothing");
        let regressions = inputs(&root.join("regressions").join(name));
        for file in corpus.iter().chain(&regressions) {
            let data = std::fs::read(file).unwrap();
            let run = std::panic::catch_unwind(|| target(&data));
            assert!(run.is_ok(), "fuzz target {name} panicked on {}", file.display());
        }
        eprintln!("{name}: {} corpus inputs, {} regressions", corpus.len(), regressions.len());
    }
}
