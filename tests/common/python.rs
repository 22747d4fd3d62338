//! Python tools the tests drive (Helm's SDK, moto), installed once into a venv under target/,
//! as the Debian packages are: `pip install` of pinned versions from PyPI.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The venv's python with `packages` (pinned `name==version`) installed.
pub fn python(packages: &[&str]) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyenv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .expect("python3 is installed (scripts/test.sh installs python3-venv)");
        assert!(
            out.status.success(),
            "python3 -m venv {}: {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|spec| {
            let (name, version) = spec.split_once("==").expect("a pinned package");
            // `moto[server]`: the distribution is `moto`.
            let name = name.split('[').next().unwrap_or(name);
            let out = Command::new(&python)
                .args([
                    "-c",
                    "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))",
                    name,
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() != version
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("installing {} into {}", missing.join(" "), venv.display());
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install {}: {}",
            missing.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    python
}
