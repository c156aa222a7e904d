//! Config files for the daemons: `--config FILE` (TOML) supplies flags.
//!
//! Every key of the file is the long name of a command-line flag, with its value:
//! ```toml
//! # /etc/wisp/wispd.toml
//! server = "10.0.0.1:7070"
//! mount = "/wisp"
//! key = "/etc/wisp/cluster.key"
//! registry = ["10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.3:7070"]
//! threads = 32
//! no-agent = false
//! ```
//! Flags on the command line win over the file. Unknown keys are refused by the same
//! parser that refuses unknown flags, so a typo in the file is reported by name.

use std::ffi::OsString;
use std::path::Path;

/// Errors reading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {msg}")]
    Parse { path: String, msg: String },
    #[error("config file {path}: key {key} has a value of a kind no flag takes (use a string, number, boolean or list)")]
    Value { path: String, key: String },
}

/// The process arguments with the flags of `--config FILE` (if given) inserted right after
/// the program name, so that flags given on the command line come later and win.
pub fn args_with_config() -> Result<Vec<OsString>, ConfigError> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut path = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    if let Some(p) = it.next() {
        rest.push(p);
    }
    while let Some(a) = it.next() {
        if a == "--config" {
            path = it.next();
        } else if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            path = Some(OsString::from(v));
        } else {
            rest.push(a);
        }
    }
    let Some(path) = path else { return Ok(rest) };
    // Flags given on the command line win: leave those out of what the file supplies.
    let given: std::collections::HashSet<String> = rest
        .iter()
        .filter_map(|a| a.to_str())
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();
    let mut out = vec![rest.remove(0)];
    let from_file = flags_from_file(Path::new(&path))?;
    let mut i = 0;
    while i < from_file.len() {
        let flag = from_file[i].to_string_lossy().into_owned();
        let has_value = from_file
            .get(i + 1)
            .is_some_and(|v| !v.to_string_lossy().starts_with("--"));
        let n = if has_value { 2 } else { 1 };
        if !given.contains(&flag) {
            out.extend(from_file[i..i + n].iter().cloned());
        }
        i += n;
    }
    out.extend(rest);
    Ok(out)
}

/// The flags a config file stands for.
pub fn flags_from_file(path: &Path) -> Result<Vec<OsString>, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: p.clone(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: p.clone(),
            msg: e.to_string(),
        })?;
    let mut out = Vec::new();
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &toml::Value| -> Option<String> {
            match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(i) => Some(i.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                _ => None,
            }
        };
        match &v {
            toml::Value::Boolean(true) => out.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let vals: Option<Vec<String>> = items.iter().map(scalar).collect();
                let vals = vals.ok_or_else(|| ConfigError::Value {
                    path: p.clone(),
                    key: k.clone(),
                })?;
                out.push(flag.into());
                out.push(vals.join(",").into());
            }
            other => {
                let s = scalar(other).ok_or_else(|| ConfigError::Value {
                    path: p.clone(),
                    key: k.clone(),
                })?;
                out.push(flag.into());
                out.push(s.into());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_becomes_flags() {
        let d = std::env::temp_dir().join(format!("wisp-cfg-{}", std::process::id()));
        std::fs::write(&d, "server = \"1.2.3.4:7070\"\nthreads = 8\nno_agent = true\nquiet = false\nregistry = [\"a:1\", \"b:2\"]\n").unwrap();
        let f: Vec<String> = flags_from_file(&d)
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(f.windows(2).any(|w| w == ["--server", "1.2.3.4:7070"]));
        assert!(f.windows(2).any(|w| w == ["--threads", "8"]));
        assert!(f.windows(2).any(|w| w == ["--registry", "a:1,b:2"]));
        assert!(f.contains(&"--no-agent".to_string()) && !f.iter().any(|x| x == "--quiet"));
        std::fs::write(&d, "server = {a = 1}\n").unwrap();
        assert!(matches!(
            flags_from_file(&d),
            Err(ConfigError::Value { .. })
        ));
        std::fs::write(&d, "server = \n").unwrap();
        assert!(matches!(
            flags_from_file(&d),
            Err(ConfigError::Parse { .. })
        ));
        let _ = std::fs::remove_file(&d);
    }
}
