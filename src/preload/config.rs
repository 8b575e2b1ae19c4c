//! The interposer's settings, read once from the environment.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `SNAPKV_BUDGET` | cells kept per KV head (`1024`), or a fraction of the prompt (`0.1`, `10%`); unset: pass-through | unset |
//! | `SNAPKV_WINDOW` | observation window (tokens) | 32 |
//! | `SNAPKV_PRESET` | `default`, `facts` or `reconstruct` ([`Preset`]) | `reconstruct` with `SNAPKV_METHOD=reconstruct`, `default` otherwise |
//! | `SNAPKV_METHOD` | `snapkv`, `keydiff` or `reconstruct` (question-agnostic: for a conversation about a document that goes on after its first question) | `snapkv` |
//! | `SNAPKV_MIN_PROMPT` | prompts shorter than this many tokens are left alone | 0 |
//! | `SNAPKV_LOG` | `0` silences the compression lines, `debug` adds why a prompt was not compressed | `1` |

use crate::snapkv::config::{Budget, Preset, SnapKvConfig};

/// The methods a host's prompts can be compressed with: SnapKV, and the two
/// that need no question at the prompt's end.
pub(crate) const METHODS: [&str; 3] = ["snapkv", "keydiff", "reconstruct"];

/// `name` as one of [`METHODS`].
pub(crate) fn method(name: &str) -> Result<&'static str, String> {
    METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| format!("expected {}", METHODS.join(", ")))
}

/// How much the interposer logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LogLevel {
    Off,
    Compressions,
    Debug,
}

/// The interposer's settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub config: SnapKvConfig,
    /// The selection method ([`METHODS`]).
    pub method: &'static str,
    pub min_prompt: usize,
    pub log: LogLevel,
}

/// Reads the settings through `var`. `Ok(None)`: `SNAPKV_BUDGET` is unset,
/// and the library is a pure pass-through. `Err`: the one line to print
/// before passing through.
pub(crate) fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, String> {
    let get = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let Some(budget) = get("SNAPKV_BUDGET") else {
        return Ok(None);
    };
    let method = match get("SNAPKV_METHOD") {
        Some(m) => method(&m).map_err(|why| format!("SNAPKV_METHOD={m:?}: {why}"))?,
        None => METHODS[0],
    };
    // Each method's measured best unless a preset is named.
    let preset = match get("SNAPKV_PRESET") {
        Some(p) => p
            .parse::<Preset>()
            .map_err(|_| format!("SNAPKV_PRESET={p:?}: expected `default`, `facts` or `reconstruct`"))?,
        None => Preset::for_method(method),
    };
    let mut config = preset.config();
    config.budget = parse_budget(&budget).map_err(|why| format!("SNAPKV_BUDGET={budget:?}: {why}"))?;
    if let Some(window) = get("SNAPKV_WINDOW") {
        config.window = parse_count(&window).map_err(|why| format!("SNAPKV_WINDOW={window:?}: {why}"))?;
    }
    config
        .validate()
        .map_err(|e| format!("SNAPKV_BUDGET/SNAPKV_WINDOW: {e}"))?;
    let min_prompt = match get("SNAPKV_MIN_PROMPT") {
        Some(v) => parse_count(&v).map_err(|why| format!("SNAPKV_MIN_PROMPT={v:?}: {why}"))?,
        None => 0,
    };
    let log = match get("SNAPKV_LOG").as_deref() {
        None | Some("1") => LogLevel::Compressions,
        Some("0") => LogLevel::Off,
        Some("debug") => LogLevel::Debug,
        Some(other) => return Err(format!("SNAPKV_LOG={other:?}: expected 0, 1 or debug")),
    };
    Ok(Some(Settings {
        config,
        method,
        min_prompt,
        log,
    }))
}

fn parse_count(v: &str) -> Result<usize, String> {
    v.parse::<usize>().map_err(|_| "expected a whole number".to_string())
}

fn parse_budget(v: &str) -> Result<Budget, String> {
    if let Some(percent) = v.strip_suffix('%') {
        let p: f64 = percent
            .trim()
            .parse()
            .map_err(|_| "expected cells (1024), a fraction (0.1) or a percentage (10%)".to_string())?;
        return Ok(Budget::Fraction(p / 100.0));
    }
    if let Ok(cells) = v.parse::<usize>() {
        return Ok(Budget::Cells(cells));
    }
    match v.parse::<f64>() {
        Ok(f) => Ok(Budget::Fraction(f)),
        Err(_) => Err("expected cells (1024), a fraction (0.1) or a percentage (10%)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<Option<Settings>, String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn no_budget_is_a_pass_through() {
        assert_eq!(read(&[]), Ok(None));
        assert_eq!(read(&[("SNAPKV_WINDOW", "16"), ("SNAPKV_BUDGET", " ")]), Ok(None));
    }

    #[test]
    fn budgets_read_as_cells_fractions_and_percentages() {
        let cells = read(&[("SNAPKV_BUDGET", "256")]).unwrap().unwrap();
        assert_eq!(cells.config.budget, Budget::Cells(256));
        assert_eq!(
            (cells.min_prompt, cells.log, cells.method),
            (0, LogLevel::Compressions, "snapkv")
        );
        let fraction = read(&[("SNAPKV_BUDGET", "0.25")]).unwrap().unwrap();
        assert_eq!(fraction.config.budget, Budget::Fraction(0.25));
        let percent = read(&[("SNAPKV_BUDGET", "10%")]).unwrap().unwrap();
        assert_eq!(percent.config.budget, Budget::Fraction(0.1));
    }

    #[test]
    fn every_variable_is_applied() {
        let s = read(&[
            ("SNAPKV_BUDGET", "512"),
            ("SNAPKV_WINDOW", "16"),
            ("SNAPKV_PRESET", "facts"),
            ("SNAPKV_MIN_PROMPT", "2000"),
            ("SNAPKV_LOG", "debug"),
            ("SNAPKV_METHOD", "Reconstruct"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.method, "reconstruct");
        let mut facts = Preset::Facts.config();
        facts.window = 16;
        facts.budget = Budget::Cells(512);
        assert_eq!(s.config, facts);
        assert_eq!((s.min_prompt, s.log), (2000, LogLevel::Debug));
    }

    #[test]
    fn reconstruct_takes_its_own_preset_unless_one_is_named() {
        let s = read(&[("SNAPKV_BUDGET", "512"), ("SNAPKV_METHOD", "reconstruct")])
            .unwrap()
            .unwrap();
        let mut want = Preset::Reconstruct.config();
        want.budget = Budget::Cells(512);
        assert_eq!(s.config, want);
        let named = read(&[
            ("SNAPKV_BUDGET", "512"),
            ("SNAPKV_METHOD", "reconstruct"),
            ("SNAPKV_PRESET", "default"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(named.config.kernel, SnapKvConfig::default().kernel);
        let keydiff = read(&[("SNAPKV_BUDGET", "512"), ("SNAPKV_METHOD", "keydiff")])
            .unwrap()
            .unwrap();
        assert_eq!(keydiff.config.pooling, SnapKvConfig::default().pooling);
        let preset = read(&[("SNAPKV_BUDGET", "512"), ("SNAPKV_PRESET", "RECONSTRUCT")])
            .unwrap()
            .unwrap();
        assert_eq!((preset.method, preset.config.kernel), ("snapkv", 7));
    }

    #[test]
    fn invalid_values_are_one_line_naming_the_variable() {
        for (pairs, name) in [
            (vec![("SNAPKV_BUDGET", "lots")], "SNAPKV_BUDGET"),
            (vec![("SNAPKV_BUDGET", "1.5")], "SNAPKV_BUDGET"),
            (vec![("SNAPKV_BUDGET", "16"), ("SNAPKV_WINDOW", "32")], "SNAPKV_BUDGET"),
            (vec![("SNAPKV_BUDGET", "256"), ("SNAPKV_WINDOW", "-3")], "SNAPKV_WINDOW"),
            (
                vec![("SNAPKV_BUDGET", "256"), ("SNAPKV_PRESET", "fast")],
                "SNAPKV_PRESET",
            ),
            (
                vec![("SNAPKV_BUDGET", "256"), ("SNAPKV_MIN_PROMPT", "x")],
                "SNAPKV_MIN_PROMPT",
            ),
            (
                vec![("SNAPKV_BUDGET", "256"), ("SNAPKV_METHOD", "streaming")],
                "SNAPKV_METHOD",
            ),
            (vec![("SNAPKV_BUDGET", "256"), ("SNAPKV_LOG", "loud")], "SNAPKV_LOG"),
        ] {
            let err = read(&pairs).unwrap_err();
            assert!(err.contains(name) && !err.contains('\n'), "{pairs:?}: {err}");
        }
    }
}
