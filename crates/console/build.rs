//! Builds the web console (`console/` at the workspace root: Vite + Preact) into
//! `$OUT_DIR/dist` with `npm ci` (when `node_modules` is missing or older than the lock file) and
//! `npm run build`, then writes `$OUT_DIR/assets.rs`: one `include_bytes!` per built file, so
//! the binary carries the console and serves it without Node.
//!
//! Needs Node.js >= 18.18 (20 recommended) and npm on `PATH`. `OPENIMS_CONSOLE_DIST=<dir>`
//! uses an already built `dist` directory instead (for machines without Node).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let src = manifest.join("../../console");
    println!("cargo:rerun-if-env-changed=OPENIMS_CONSOLE_DIST");
    let dist = match std::env::var_os("OPENIMS_CONSOLE_DIST") {
        Some(d) => PathBuf::from(d),
        None => {
            for f in [
                "package.json",
                "package-lock.json",
                "index.html",
                "vite.config.ts",
                "tsconfig.json",
                "src",
            ] {
                println!("cargo:rerun-if-changed={}", src.join(f).display());
            }
            let dist = out.join("dist");
            build_with_npm(&src, &dist);
            dist
        }
    };
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files);
    files.sort();
    if !files.iter().any(|(rel, _)| rel == "index.html") {
        panic!(
            "the console build in {} has no index.html; run `npm ci && npm run build` in console/",
            dist.display()
        );
    }
    let mut code = String::from("/// Built console files: (path under /console/, content).\npub static ASSETS: &[(&str, &[u8])] = &[\n");
    for (rel, abs) in &files {
        writeln!(
            code,
            "    ({rel:?}, include_bytes!({:?})),",
            abs.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    std::fs::write(out.join("assets.rs"), code).unwrap();
}

fn npm() -> Command {
    let mut c = Command::new("npm");
    // npm's own progress and update notices only add noise to cargo's output.
    c.env("NO_UPDATE_NOTIFIER", "1")
        .arg("--no-fund")
        .arg("--no-audit");
    c
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn build_with_npm(src: &Path, dist: &Path) {
    let installed = src.join("node_modules/.package-lock.json");
    let stale = match (mtime(&installed), mtime(&src.join("package-lock.json"))) {
        (Some(i), Some(l)) => i < l,
        _ => true,
    };
    if stale {
        run(npm().arg("ci").current_dir(src), "npm ci");
    }
    let _ = std::fs::remove_dir_all(dist);
    run(
        npm()
            .args(["run", "build", "--", "--outDir"])
            .arg(dist)
            .arg("--emptyOutDir")
            .current_dir(src),
        "npm run build",
    );
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "could not run `{what}` to build the web console ({e}). Building OpenIMS needs \
             Node.js >= 18.18 and npm on PATH (see README.md), or OPENIMS_CONSOLE_DIST=<built dist dir>."
        )
    });
    if !status.success() {
        panic!("`{what}` failed ({status}) while building the web console in console/");
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(root, &p, out);
        } else {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, p.canonicalize().unwrap()));
        }
    }
}
