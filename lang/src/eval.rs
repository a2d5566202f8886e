//! Evaluation of value expressions: integer and decimal arithmetic, `let`
//! constants, and units. Quantities are converted to SI base units when the
//! unit is attached; integers stay exact and overflow is an error.

use crate::ast::{BinOp, Expr, ExprKind, Unit};
use crate::diag::Diagnostic;
use crate::span::Span;
use std::collections::BTreeMap;

/// What a unit measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Bytes,
    Bandwidth,
    Time,
    Compute,
}

impl Dim {
    pub fn describe(self) -> &'static str {
        match self {
            Dim::Bytes => "a size (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)",
            Dim::Bandwidth => "a bandwidth (GB/s, TB/s, Gb/s, ...)",
            Dim::Time => "a time (ns, us, ms, s)",
            Dim::Compute => "a compute rate (GFLOP/s, TFLOP/s, PFLOP/s)",
        }
    }

    pub fn example(self) -> &'static str {
        match self {
            Dim::Bytes => "80 GB",
            Dim::Bandwidth => "450 GB/s",
            Dim::Time => "3 us",
            Dim::Compute => "989 TFLOP/s",
        }
    }
}

/// The dimension of a unit and the factor that converts it to base units.
pub fn unit_info(unit: &str) -> Option<(Dim, f64)> {
    let k = 1e3;
    let ki = 1024.0;
    Some(match unit {
        "B" => (Dim::Bytes, 1.0),
        "KB" => (Dim::Bytes, k),
        "MB" => (Dim::Bytes, k * k),
        "GB" => (Dim::Bytes, k * k * k),
        "TB" => (Dim::Bytes, k * k * k * k),
        "KiB" => (Dim::Bytes, ki),
        "MiB" => (Dim::Bytes, ki * ki),
        "GiB" => (Dim::Bytes, ki * ki * ki),
        "TiB" => (Dim::Bytes, ki * ki * ki * ki),
        "B/s" => (Dim::Bandwidth, 1.0),
        "KB/s" => (Dim::Bandwidth, k),
        "MB/s" => (Dim::Bandwidth, k * k),
        "GB/s" => (Dim::Bandwidth, k * k * k),
        "TB/s" => (Dim::Bandwidth, k * k * k * k),
        "KiB/s" => (Dim::Bandwidth, ki),
        "MiB/s" => (Dim::Bandwidth, ki * ki),
        "GiB/s" => (Dim::Bandwidth, ki * ki * ki),
        "Kb/s" => (Dim::Bandwidth, k / 8.0),
        "Mb/s" => (Dim::Bandwidth, k * k / 8.0),
        "Gb/s" => (Dim::Bandwidth, k * k * k / 8.0),
        "Tb/s" => (Dim::Bandwidth, k * k * k * k / 8.0),
        "ns" => (Dim::Time, 1e-9),
        "us" | "µs" => (Dim::Time, 1e-6),
        "ms" => (Dim::Time, 1e-3),
        "s" => (Dim::Time, 1.0),
        "GFLOP/s" => (Dim::Compute, 1e9),
        "TFLOP/s" => (Dim::Compute, 1e12),
        "PFLOP/s" => (Dim::Compute, 1e15),
        _ => return None,
    })
}

/// A computed value.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Int(i64),
    Float(f64),
    /// A value with a unit, in base units.
    Quantity(f64, Dim),
    Bool(bool),
    Str(String),
}

impl Val {
    pub fn describe(&self) -> &'static str {
        match self {
            Val::Int(_) => "an integer",
            Val::Float(_) => "a decimal number",
            Val::Quantity(..) => "a quantity with a unit",
            Val::Bool(_) => "a boolean",
            Val::Str(_) => "a string",
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(*i as f64),
            Val::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// `let` constants in scope: name -> value and where it was defined.
pub type Constants = BTreeMap<String, (Val, Span)>;

/// Reads an integer literal (`14_336`), or says why it cannot.
pub fn int_literal(text: &str, span: Span) -> Result<i64, Diagnostic> {
    let digits: String = text.chars().filter(|c| *c != '_').collect();
    digits.parse::<i64>().map_err(|_| {
        Diagnostic::error("E0205", span, format!("integer `{text}` is too large"))
            .label("does not fit in 64 bits")
    })
}

fn float_literal(text: &str, span: Span) -> Result<f64, Diagnostic> {
    let digits: String = text.chars().filter(|c| *c != '_').collect();
    match digits.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(
            Diagnostic::error("E0202", span, format!("number `{text}` is out of range"))
                .label("not a finite number"),
        ),
    }
}

/// Evaluates an expression; bare names must be constants.
pub fn eval(expr: &Expr, consts: &Constants) -> Result<Val, Diagnostic> {
    match &expr.kind {
        ExprKind::Int(text) => int_literal(text, expr.span).map(Val::Int),
        ExprKind::Float(text) => float_literal(text, expr.span).map(Val::Float),
        ExprKind::Str(s) => Ok(Val::Str(s.clone())),
        ExprKind::Bool(b) => Ok(Val::Bool(*b)),
        ExprKind::Name(name) => match consts.get(name) {
            Some((v, _)) => Ok(v.clone()),
            None => {
                let mut d =
                    Diagnostic::error("E0105", expr.span, format!("unknown constant `{name}`"))
                        .label("not defined by a `let` above");
                if let Some(s) = crate::check::suggest(name, consts.keys().map(String::as_str)) {
                    d = d.help(format!("did you mean `{s}`?"));
                }
                Err(d)
            }
        },
        ExprKind::Paren(inner) => eval(inner, consts),
        ExprKind::Neg(inner) => match eval(inner, consts)? {
            Val::Int(i) => i
                .checked_neg()
                .map(Val::Int)
                .ok_or_else(|| overflow(expr.span)),
            Val::Float(f) => Ok(Val::Float(-f)),
            Val::Quantity(q, d) => Ok(Val::Quantity(-q, d)),
            other => Err(type_error(expr.span, "-", &other)),
        },
        ExprKind::Binary(op, a, b) => {
            let x = eval(a, consts)?;
            let y = eval(b, consts)?;
            binary(*op, x, y, expr.span)
        }
    }
}

/// Evaluates a value expression and attaches its unit, if any.
pub fn eval_with_unit(
    expr: &Expr,
    unit: Option<&Unit>,
    consts: &Constants,
) -> Result<Val, Diagnostic> {
    let v = eval(expr, consts)?;
    let Some(unit) = unit else { return Ok(v) };
    let Some((dim, factor)) = unit_info(&unit.name) else {
        return Err(Diagnostic::error(
            "E0203",
            unit.span,
            format!("unknown unit `{}`", unit.name),
        ));
    };
    match v {
        Val::Int(_) | Val::Float(_) => {
            let base = v.as_f64().unwrap_or(0.0) * factor;
            if base.is_finite() {
                Ok(Val::Quantity(base, dim))
            } else {
                Err(overflow(expr.span.to(unit.span)))
            }
        }
        Val::Quantity(..) => {
            Err(
                Diagnostic::error("E0203", unit.span, "this value already has a unit")
                    .label("second unit"),
            )
        }
        other => Err(type_error(expr.span, unit.name.as_str(), &other)),
    }
}

fn overflow(span: Span) -> Diagnostic {
    Diagnostic::error("E0204", span, "arithmetic overflow")
        .label("the result does not fit in 64 bits")
}

fn type_error(span: Span, op: &str, v: &Val) -> Diagnostic {
    Diagnostic::error(
        "E0204",
        span,
        format!("`{op}` cannot be applied to {}", v.describe()),
    )
    .label("not a number")
}

fn finite(v: f64, span: Span) -> Result<Val, Diagnostic> {
    if v.is_finite() {
        Ok(Val::Float(v))
    } else {
        Err(overflow(span))
    }
}

fn binary(op: BinOp, x: Val, y: Val, span: Span) -> Result<Val, Diagnostic> {
    use Val::*;
    let sym = op.symbol();
    match (x, y) {
        (Int(a), Int(b)) => match op {
            BinOp::Add => a.checked_add(b).map(Int).ok_or_else(|| overflow(span)),
            BinOp::Sub => a.checked_sub(b).map(Int).ok_or_else(|| overflow(span)),
            BinOp::Mul => a.checked_mul(b).map(Int).ok_or_else(|| overflow(span)),
            BinOp::Div => {
                if b == 0 {
                    Err(Diagnostic::error("E0204", span, "division by zero")
                        .label("divides by zero"))
                } else if a.checked_rem(b).is_none() {
                    // i64::MIN / -1: the only integer division that overflows.
                    Err(overflow(span))
                } else if a % b == 0 {
                    Ok(Int(a / b))
                } else {
                    // Integer fields then reject the result with a clear message
                    // rather than truncating silently.
                    finite(a as f64 / b as f64, span)
                }
            }
        },
        (a @ (Int(_) | Float(_)), b @ (Int(_) | Float(_))) => {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            match op {
                BinOp::Add => finite(a + b, span),
                BinOp::Sub => finite(a - b, span),
                BinOp::Mul => finite(a * b, span),
                BinOp::Div if b == 0.0 => {
                    Err(Diagnostic::error("E0204", span, "division by zero")
                        .label("divides by zero"))
                }
                BinOp::Div => finite(a / b, span),
            }
        }
        (Quantity(q, d), n @ (Int(_) | Float(_))) if matches!(op, BinOp::Mul | BinOp::Div) => {
            let n = n.as_f64().unwrap_or(0.0);
            if op == BinOp::Div && n == 0.0 {
                return Err(
                    Diagnostic::error("E0204", span, "division by zero").label("divides by zero")
                );
            }
            let v = if op == BinOp::Mul { q * n } else { q / n };
            if v.is_finite() {
                Ok(Quantity(v, d))
            } else {
                Err(overflow(span))
            }
        }
        (n @ (Int(_) | Float(_)), Quantity(q, d)) if op == BinOp::Mul => {
            let v = n.as_f64().unwrap_or(0.0) * q;
            if v.is_finite() {
                Ok(Quantity(v, d))
            } else {
                Err(overflow(span))
            }
        }
        (Quantity(a, da), Quantity(b, db)) if da == db => match op {
            BinOp::Add => Ok(Quantity(a + b, da)),
            BinOp::Sub => Ok(Quantity(a - b, da)),
            BinOp::Div if b != 0.0 => finite(a / b, span),
            BinOp::Div => {
                Err(Diagnostic::error("E0204", span, "division by zero").label("divides by zero"))
            }
            _ => Err(Diagnostic::error(
                "E0204",
                span,
                format!("`{sym}` of two quantities is not a quantity moec knows"),
            )
            .label("units do not combine this way")),
        },
        (Quantity(_, da), Quantity(_, db)) => Err(Diagnostic::error(
            "E0204",
            span,
            format!("cannot combine {} with {}", da.describe(), db.describe()),
        )
        .label("mismatched units")),
        (a, b) => {
            let culprit = if matches!(a, Bool(_) | Str(_)) { a } else { b };
            Err(type_error(span, sym, &culprit))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::ValueKind;

    fn value(src: &str) -> Result<Val, Diagnostic> {
        let parsed = crate::parser::parse(&format!("let x = {src}"));
        let file = parsed.file.expect("parses");
        let crate::ast::Item::Let(l) = &file.items[0] else {
            panic!("not a let")
        };
        let ValueKind::Expr { expr, unit } = &l.value.kind else {
            panic!("not an expression")
        };
        eval_with_unit(expr, unit.as_ref(), &Constants::new())
    }

    #[test]
    fn integer_arithmetic_is_exact() {
        assert_eq!(value("2 * 7168 + 1").ok(), Some(Val::Int(14337)));
        assert_eq!(value("8192 / 2").ok(), Some(Val::Int(4096)));
        assert_eq!(value("7 / 2").ok(), Some(Val::Float(3.5)));
    }

    #[test]
    fn units_convert_to_base() {
        assert_eq!(
            value("450 GB/s").ok(),
            Some(Val::Quantity(450e9, Dim::Bandwidth))
        );
        assert_eq!(
            value("400 Gb/s").ok(),
            Some(Val::Quantity(50e9, Dim::Bandwidth))
        );
        assert_eq!(value("3 us").ok(), Some(Val::Quantity(3e-6, Dim::Time)));
    }

    #[test]
    fn overflow_and_division_by_zero_are_errors() {
        assert_eq!(
            value("9223372036854775807 * 2").err().map(|d| d.code),
            Some("E0204")
        );
        assert_eq!(value("1 / 0").err().map(|d| d.code), Some("E0204"));
        assert_eq!(
            value("99999999999999999999").err().map(|d| d.code),
            Some("E0205")
        );
    }
}
