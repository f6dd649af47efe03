//! Flow packages for tests: built from an app crate once per test binary,
//! or read from a file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

const TARGET: &str = "wasm32-wasip2";

/// A flow package: the bytes of a component.
#[derive(Clone)]
pub struct Package {
    bytes: Arc<Vec<u8>>,
    path: PathBuf,
}

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package")
            .field("path", &self.path)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl Package {
    /// Builds the app crate at `crate_dir` (relative paths: from the
    /// current directory, which `cargo test` sets to the testing crate's)
    /// for `wasm32-wasip2` in release mode, once per test binary. Panics
    /// with cargo's messages if it does not build.
    ///
    /// The build goes to `$BRAID_WASM_TARGET_DIR`, else to `target/flowtest`
    /// under the app crate, never to the target directory the tests run
    /// from (cargo holds its lock).
    pub fn build(crate_dir: impl AsRef<Path>) -> Package {
        static BUILT: Mutex<Option<HashMap<PathBuf, Package>>> = Mutex::new(None);
        let dir = crate_dir.as_ref();
        let dir = dir
            .canonicalize()
            .unwrap_or_else(|e| panic!("no app crate at {}: {e}", dir.display()));
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = built.get_or_insert_with(HashMap::new).get(&dir) {
            return p.clone();
        }
        let target_dir = std::env::var_os("BRAID_WASM_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join("target").join("flowtest"));
        let wasm = build_component(&dir, Some(&target_dir))
            .unwrap_or_else(|e| panic!("building the flow package {}: {e:#}", dir.display()));
        let p = Package::from_file(&wasm);
        built
            .get_or_insert_with(HashMap::new)
            .insert(dir, p.clone());
        p
    }

    /// The package in the file `path` (a `.wasm` component).
    pub fn from_file(path: impl AsRef<Path>) -> Package {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("reading the flow package {}: {e}", path.display()));
        Package {
            bytes: Arc::new(bytes),
            path: path.to_path_buf(),
        }
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn path_display(&self) -> String {
        self.path.display().to_string()
    }
}

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
                anyhow::bail!("`rustup target add {TARGET}` failed; install the target and retry");
            }
            Ok(())
        }
        // Without rustup, let cargo report whether the target is there.
        Err(_) => Ok(()),
    }
}

/// Builds the app crate at `crate_dir` for `wasm32-wasip2` in release
/// mode (into `target_dir`, else cargo's default) and returns the path of
/// the component it made. Cargo's messages go to stderr.
pub fn build_component(crate_dir: &Path, target_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    ensure_target()?;
    let manifest = crate_dir.join("Cargo.toml");
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("{} has no Cargo.toml", crate_dir.display()))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--message-format=json-render-diagnostics",
        "--manifest-path",
    ])
    .arg(&manifest);
    if let Some(t) = target_dir {
        cmd.arg("--target-dir").arg(t);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        anyhow::bail!(
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
    wasm.with_context(|| {
        format!(
            "{} produced no .wasm: is it a `crate-type = [\"cdylib\"]` app crate?",
            crate_dir.display()
        )
    })
}
