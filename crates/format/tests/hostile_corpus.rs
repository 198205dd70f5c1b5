//! The hostile corpus: every file is refused with its expected reason.
//!
//! `HOSTILE_CORPUS_DIR=/some/dir cargo test -p openims-format --test hostile_corpus
//! write_corpus_to_dir` writes the corpus for other test suites (see
//! `scripts/make-hostile-corpus.sh`).

mod hostile;
mod util;

use openims_format::inspect::{inspect, InspectOptions};
use openims_format::DiskFormat;

#[test]
fn every_hostile_file_is_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = hostile::write_corpus(dir.path());
    assert!(cases.len() >= 35, "corpus has {} files", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let f = std::fs::File::open(dir.path().join(&c.file)).unwrap();
        let opts = InspectOptions {
            declared_format: c.declared_format.as_deref().and_then(DiskFormat::parse),
            ..Default::default()
        };
        let ins = inspect(&f, &opts).unwrap();
        let names = ins.violation_names();
        eprintln!("{:40} {:?}", c.file, names);
        let missing: Vec<_> = c
            .expected
            .iter()
            .filter(|e| !names.contains(&e.as_str()))
            .collect();
        if ins.is_safe() || !missing.is_empty() {
            failures.push(format!(
                "{}: expected {:?}, got {:?}",
                c.file, c.expected, names
            ));
        }
        // Every message is non-empty and names are namespaced.
        for v in &ins.violations {
            assert!(!v.to_string().is_empty() && v.name().contains('.'));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The manifest is written and parses.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    assert_eq!(m.as_array().unwrap().len(), cases.len());
}

/// Writes the corpus to `$HOSTILE_CORPUS_DIR` (no-op when unset).
#[test]
fn write_corpus_to_dir() {
    if let Some(dir) = std::env::var_os("HOSTILE_CORPUS_DIR") {
        let cases = hostile::write_corpus(std::path::Path::new(&dir));
        eprintln!(
            "wrote {} hostile files and expected.json to {}",
            cases.len(),
            dir.to_string_lossy()
        );
    }
}
