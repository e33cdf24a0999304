//! `segwlb policy new` and `segwlb policy build`: a working starting point
//! for a policy in Rust, Python or JavaScript, and the Python and JavaScript
//! toolchains (componentize-py, componentize-js) run against the contract.
//!
//! The contract travels inside the binary, so both work from any directory.
//! The toolchains are found in `$SEGWLB_TOOLS`, else `.tools/` in the
//! current directory or the repository the binary was built in
//! (`scripts/setup.sh --polyglot` installs them there), else on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The contract, as the guests' toolchains read it.
pub const WIT: &str = include_str!("../../wit/policy.wit");

/// The languages a policy can be written in here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl Lang {
    /// The language of a source file or a policy directory.
    pub fn of(path: &Path) -> Option<(Lang, PathBuf)> {
        if path.is_dir() {
            for (file, lang) in [("app.py", Lang::Python), ("policy.js", Lang::Js)] {
                if path.join(file).is_file() {
                    return Some((lang, path.join(file)));
                }
            }
            return None;
        }
        match path.extension()?.to_str()? {
            "py" => Some((Lang::Python, path.into())),
            "js" | "mjs" => Some((Lang::Js, path.into())),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: already exists; choose another name or remove it", .0.display())]
    Exists(PathBuf),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("`{0}` is not a policy name: use letters, digits and '-' (it names the .wasm file)")]
    BadName(String),
    #[error(
        "{}: not a Python or JavaScript policy (a .py or .js file, or a directory \
         holding app.py or policy.js); Rust policies are built by `cargo build`",
        .0.display()
    )]
    UnknownLanguage(PathBuf),
    #[error(
        "{tool} not found; install it with `scripts/setup.sh --polyglot` (or set SEGWLB_TOOLS)"
    )]
    NoTool { tool: &'static str },
    #[error("{tool} failed on {}:\n{output}", file.display())]
    ToolFailed {
        tool: &'static str,
        file: PathBuf,
        output: String,
    },
}

/// Files `policy new` writes, relative to the new policy's directory.
fn template(lang: Lang) -> &'static [(&'static str, &'static str)] {
    match lang {
        Lang::Rust => &[
            ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
            ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
        ],
        Lang::Python => &[("app.py", include_str!("../templates/python/app.py"))],
        Lang::Js => &[("policy.js", include_str!("../templates/js/policy.js"))],
    }
}

/// Write a new policy `name` in `lang` under `dir`; returns its directory.
pub fn new_policy(name: &str, lang: Lang, dir: &Path) -> Result<PathBuf, Error> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !valid {
        return Err(Error::BadName(name.into()));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(Error::Exists(root));
    }
    for (file, text) in template(lang) {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::Io {
                path: parent.into(),
                err: e,
            })?;
        }
        let text = text
            .replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"));
        std::fs::write(&path, text).map_err(|e| Error::Io {
            path: path.clone(),
            err: e,
        })?;
    }
    Ok(root)
}

/// The policy's name: its directory's for `DIR/app.py` and `DIR/policy.js`,
/// else the file's stem.
pub fn policy_name(source: &Path) -> String {
    let stem = source.file_stem().unwrap_or_default().to_string_lossy();
    if stem == "app" || stem == "policy" {
        if let Some(dir) = source.parent().and_then(|p| p.canonicalize().ok()) {
            if let Some(name) = dir.file_name() {
                return name.to_string_lossy().into_owned();
            }
        }
    }
    stem.into_owned()
}

/// Build a Python or JavaScript policy into the component `out`.
pub fn build(path: &Path, out: &Path) -> Result<(), Error> {
    let (lang, source) = Lang::of(path).ok_or_else(|| Error::UnknownLanguage(path.into()))?;
    let wit_dir = tempfile_dir()?;
    let wit = wit_dir.join("policy.wit");
    std::fs::write(&wit, WIT).map_err(|e| Error::Io {
        path: wit.clone(),
        err: e,
    })?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::Io {
            path: parent.into(),
            err: e,
        })?;
    }
    let src_dir = source
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (tool, mut cmd) = match lang {
        Lang::Python => {
            // The module is the file's stem; componentize-py finds it on -p.
            let module = source.file_stem().unwrap_or_default().to_string_lossy();
            let mut c = Command::new(find_tool("venv/bin/componentize-py", "componentize-py")?);
            c.arg("-q")
                .arg("-d")
                .arg(&wit_dir)
                .args(["-w", "policy", "componentize", "-p"])
                .arg(src_dir)
                .arg(&*module)
                .arg("-o")
                .arg(out);
            ("componentize-py", c)
        }
        Lang::Js => {
            let mut c = Command::new(find_tool(
                "node/node_modules/.bin/componentize-js",
                "componentize-js",
            )?);
            // `-d` takes several values: it goes after the source and
            // before `-o`.
            c.arg(&source)
                .arg("-w")
                .arg(&wit_dir)
                .args(["-n", "policy", "-d"])
                .args(JS_DISABLED)
                .arg("-o")
                .arg(out);
            ("componentize-js", c)
        }
        Lang::Rust => return Err(Error::UnknownLanguage(path.into())),
    };
    let output = cmd.output().map_err(|e| Error::Io {
        path: source.clone(),
        err: e,
    })?;
    let _ = std::fs::remove_dir_all(&wit_dir);
    if !output.status.success() {
        return Err(Error::ToolFailed {
            tool,
            file: source,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(())
}

/// What componentize-js leaves out: HTTP (wasi:http, which no policy may
/// import). Its stdio, random and clocks stay: they import WASI 0.2, which
/// the host links granting nothing (console.log goes to the policy's log).
const JS_DISABLED: &[&str] = &["http", "fetch-event"];

fn tempfile_dir() -> Result<PathBuf, Error> {
    let dir = std::env::temp_dir().join(format!(
        "segwlb-wit-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
        path: dir.clone(),
        err: e,
    })?;
    Ok(dir)
}

/// `rel` under a tools directory, else `name` on PATH.
fn find_tool(rel: &str, name: &'static str) -> Result<PathBuf, Error> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    let dirs = std::env::var_os("SEGWLB_TOOLS")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(".tools"), repo]);
    for dir in dirs {
        let candidate = dir.join(rel);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(Error::NoTool { tool: name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_writes_each_language_once_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        for (lang, file) in [
            (Lang::Rust, "src/lib.rs"),
            (Lang::Python, "app.py"),
            (Lang::Js, "policy.js"),
        ] {
            let name = format!("my-{lang:?}").to_lowercase();
            let root = new_policy(&name, lang, dir.path()).unwrap();
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            assert!(!text.contains("{{name}}"), "{file}: placeholder left");
            assert!(matches!(
                new_policy(&name, lang, dir.path()),
                Err(Error::Exists(_))
            ));
        }
        assert!(matches!(
            new_policy("../evil", Lang::Python, dir.path()),
            Err(Error::BadName(_))
        ));
    }

    #[test]
    fn a_policy_is_named_by_its_directory_or_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("py-thing");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("app.py"), "").unwrap();
        assert_eq!(policy_name(&p.join("app.py")), "py-thing");
        assert_eq!(policy_name(Path::new("x/other.js")), "other");
        assert_eq!(Lang::of(&p).map(|(l, _)| l), Some(Lang::Python));
        assert_eq!(Lang::of(Path::new("a.rs")), None);
    }
}
