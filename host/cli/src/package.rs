//! `braid package build`: an app crate to a flow package.

use anyhow::Context as _;
use std::path::{Path, PathBuf};

/// Builds `crate_dir` for wasm32-wasip2 in release mode and copies the
/// component to `output`.
pub fn build(crate_dir: &Path, output: &Path) -> anyhow::Result<PathBuf> {
    let wasm = braid_flowtest::build_component(crate_dir, None)?;
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(&wasm, output).with_context(|| format!("writing {}", output.display()))?;
    Ok(output.to_path_buf())
}
