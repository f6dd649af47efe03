//! `braid package build`: an app crate to a flow package.

use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGET: &str = "wasm32-wasip2";

/// Installs the wasm target with rustup if it is missing.
pub fn ensure_target() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(o)
            if String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == TARGET) =>
        {
            Ok(())
        }
        Ok(_) => {
            eprintln!("installing the {TARGET} target with rustup...");
            let st = Command::new("rustup")
                .args(["target", "add", TARGET])
                .status()?;
            if !st.success() {
                bail!("`rustup target add {TARGET}` failed; install the target and retry");
            }
            Ok(())
        }
        // Without rustup, let cargo report whether the target is there.
        Err(_) => Ok(()),
    }
}

/// Builds `crate_dir` for wasm32-wasip2 in release mode and copies the
/// component to `output`.
pub fn build(crate_dir: &Path, output: &Path) -> anyhow::Result<PathBuf> {
    ensure_target()?;
    let manifest = crate_dir.join("Cargo.toml");
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("{} has no Cargo.toml", crate_dir.display()))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!(
            "cargo build of {} failed (see the messages above)",
            crate_dir.display()
        );
    }
    let mut wasm = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact"
            || v["manifest_path"].as_str().map(Path::new) != Some(manifest.as_path())
        {
            continue;
        }
        if let Some(files) = v["filenames"].as_array() {
            for f in files.iter().filter_map(|f| f.as_str()) {
                if f.ends_with(".wasm") {
                    wasm = Some(PathBuf::from(f));
                }
            }
        }
    }
    let wasm = wasm.with_context(|| {
        format!(
            "{} produced no .wasm: is it a `crate-type = [\"cdylib\"]` app crate?",
            crate_dir.display()
        )
    })?;
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(&wasm, output).with_context(|| format!("writing {}", output.display()))?;
    Ok(output.to_path_buf())
}
