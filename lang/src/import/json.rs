//! The config's JSON: parsing, and checked accessors that name the field.

use serde_json::{Map, Value};

pub(super) fn parse_json(json: &str) -> Result<Map<String, Value>, String> {
    let json = json.strip_prefix('\u{feff}').unwrap_or(json);
    let value: Value = serde_json::from_str(json).map_err(|e| {
        let full = e.to_string();
        let message = match full.rfind(" at line ") {
            Some(i) => &full[..i],
            None => full.as_str(),
        };
        format!(
            "the file is not valid JSON: {message} (line {}, column {}).",
            e.line(),
            e.column()
        )
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(format!(
            "the top level of a config.json must be a JSON object, but this file holds {}.",
            describe(&other)
        )),
    }
}

/// How a JSON value is named in error messages.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "`null`".to_string(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if s.chars().count() > 40 { "..." } else { "" };
            format!("the string {:?}", format!("{short}{more}"))
        }
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// The largest integer a `.moe` literal can hold.
pub(super) const MAX_INT: u64 = i64::MAX as u64;

/// The fields that give the number of routed experts, in the order they are tried.
pub(super) const EXPERT_COUNT_FIELDS: [&str; 3] =
    ["num_local_experts", "num_experts", "n_routed_experts"];

/// One JSON object of the config (the top level, or `text_config`) with checked accessors.
#[derive(Clone, Copy)]
pub(super) struct Cfg<'a> {
    pub(super) obj: &'a Map<String, Value>,
    /// `""` or `"text_config."`, so that messages name the field as it is nested.
    pub(super) prefix: &'static str,
    /// The model, as named in "which a ... layer needs".
    pub(super) label: &'static str,
}

impl<'a> Cfg<'a> {
    pub(super) fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The value of a field; `null` counts as absent.
    pub(super) fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub(super) fn missing(&self, name: &str) -> String {
        format!(
            "the config has no `{}`, which a {} layer needs.",
            self.path(name),
            self.label
        )
    }

    pub(super) fn opt_int(&self, name: &str, min: u64) -> Result<Option<u64>, String> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let wrong = || {
            format!(
                "`{}` must be a whole number, but the config gives {}.",
                self.path(name),
                describe(v)
            )
        };
        let n = if let Some(n) = v.as_u64() {
            n
        } else if let Some(n) = v.as_i64() {
            return Err(format!(
                "`{}` must be at least {min}, but the config gives {n}.",
                self.path(name)
            ));
        } else if let Some(x) = v.as_f64() {
            // A whole number written as a decimal (`4096.0`) is still a whole number.
            if x.fract() != 0.0 || !x.is_finite() {
                return Err(wrong());
            }
            if x < 0.0 {
                return Err(format!(
                    "`{}` must be at least {min}, but the config gives {x}.",
                    self.path(name)
                ));
            }
            if x > MAX_INT as f64 {
                return Err(too_large(&self.path(name), &x.to_string()));
            }
            x as u64
        } else {
            return Err(wrong());
        };
        if n < min {
            return Err(format!(
                "`{}` must be at least {min}, but the config gives {n}.",
                self.path(name)
            ));
        }
        if n > MAX_INT {
            return Err(too_large(&self.path(name), &n.to_string()));
        }
        Ok(Some(n))
    }

    pub(super) fn int(&self, name: &str, min: u64) -> Result<u64, String> {
        self.opt_int(name, min)?.ok_or_else(|| self.missing(name))
    }

    /// The first of `names` that is present, with its name.
    pub(super) fn first_int(
        &self,
        names: &[&'static str],
        min: u64,
    ) -> Result<Option<(u64, String)>, String> {
        for name in names {
            if let Some(n) = self.opt_int(name, min)? {
                return Ok(Some((n, self.path(name))));
            }
        }
        Ok(None)
    }

    pub(super) fn opt_bool(&self, name: &str) -> Result<Option<bool>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!(
                "`{}` must be `true` or `false`, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
        }
    }

    /// A positive, finite number.
    pub(super) fn opt_positive(&self, name: &str) -> Result<Option<f64>, String> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
            Some(_) => Err(format!(
                "`{}` must be a positive number, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
            None => Err(format!(
                "`{}` must be a number, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
        }
    }

    pub(super) fn opt_str(&self, name: &str) -> Result<Option<&'a str>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(format!(
                "`{}` must be a string, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
        }
    }

    /// An informational whole number for comments: ignored when absent or not a count.
    pub(super) fn info_int(&self, name: &str) -> Option<u64> {
        self.get(name)
            .and_then(Value::as_u64)
            .filter(|n| *n <= MAX_INT)
    }

    pub(super) fn has_expert_count(&self) -> bool {
        EXPERT_COUNT_FIELDS.iter().any(|f| self.has(f))
    }
}

pub(super) fn too_large(field: &str, value: &str) -> String {
    format!("`{field}` is {value}, which is too large for moec (at most {MAX_INT}).")
}
