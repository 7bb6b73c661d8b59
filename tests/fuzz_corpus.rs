//! Replays every file of the fuzz corpora (`fuzz/corpus/<target>/`) through the same harnesses
//! the cargo-fuzz targets run (`fuzz/src/lib.rs`), on stable Rust: CI keeps every input the
//! fuzzer ever kept, and every crash once fixed and added here, without a nightly toolchain.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
}

/// Runs `harness` on every corpus file; reports every file that panics, not only the first.
fn replay(target: &str, harness: fn(&[u8])) {
    let files = corpus(target);
    let mut failures = Vec::new();
    for path in &files {
        let data = std::fs::read(path).expect("read corpus file");
        if let Err(panic) = std::panic::catch_unwind(|| harness(&data)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!(
                "{}: {message}\n  input: {:?}",
                path.display(),
                String::from_utf8_lossy(&data)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} inputs panic:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!("{target}: {} corpus inputs replayed", files.len());
}

#[test]
fn parse_alertmanager_corpus() {
    replay("parse_alertmanager", harness::parse_alertmanager);
}

#[test]
fn parse_v2_corpus() {
    replay("parse_v2", harness::parse_v2);
}

#[test]
fn route_corpus() {
    replay("route", harness::route);
}
