use std::fmt::Display;
use std::str::FromStr;

/// A policy's parameters from the config, consumed key by key.
///
/// Take what you understand with [`Params::get`], then call
/// [`Params::finish`]: any key left over is an error naming it, so a typo in
/// the config is caught at load time instead of silently ignored.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Params { pairs }
    }

    /// Remove `key` and parse it; `Ok(None)` when absent.
    pub fn get<T>(&mut self, key: &str) -> Result<Option<T>, String>
    where
        T: FromStr,
        T::Err: Display,
    {
        let Some(i) = self.pairs.iter().position(|(k, _)| k == key) else {
            return Ok(None);
        };
        let (_, raw) = self.pairs.swap_remove(i);
        raw.trim()
            .parse()
            .map(Some)
            .map_err(|e| format!("parameter `{key}` = {raw:?}: {e}"))
    }

    /// Fail if any parameter was not taken.
    pub fn finish(self, accepted: &[&str]) -> Result<(), String> {
        match self.pairs.first() {
            None => Ok(()),
            Some((k, _)) if accepted.is_empty() => {
                Err(format!("unknown parameter `{k}`: this policy takes none"))
            }
            Some((k, _)) => Err(format!(
                "unknown parameter `{k}`: this policy takes {}",
                accepted.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn parses_and_consumes() {
        let mut p = params(&[("table-size", " 65537 ")]);
        assert_eq!(p.get::<u32>("table-size").unwrap(), Some(65537));
        assert_eq!(p.get::<u32>("table-size").unwrap(), None);
        p.finish(&["table-size"]).unwrap();
    }

    #[test]
    fn bad_value_names_key_and_value() {
        let mut p = params(&[("table-size", "big")]);
        let err = p.get::<u32>("table-size").unwrap_err();
        assert!(
            err.contains("table-size") && err.contains("\"big\""),
            "{err}"
        );
    }

    #[test]
    fn leftover_key_is_an_error() {
        let err = params(&[("tabel-size", "7")])
            .finish(&["table-size"])
            .unwrap_err();
        assert!(
            err.contains("tabel-size") && err.contains("table-size"),
            "{err}"
        );
        let err = params(&[("x", "1")]).finish(&[]).unwrap_err();
        assert!(err.contains("takes none"), "{err}");
    }
}
