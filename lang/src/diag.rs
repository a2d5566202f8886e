//! Diagnostics: what went wrong, where, and what to do about it.
//!
//! Every diagnostic has a stable code from [`CODES`]; the test suite holds a
//! broken file for each code, so the list below is also the list of checks.

use crate::span::Span;
use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// One message about a source file.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    /// The primary place and its label.
    pub span: Span,
    pub label: String,
    /// Other places that explain the first (e.g. "first defined here").
    pub secondary: Vec<(Span, String)>,
    /// A suggestion of what to write instead.
    pub help: Option<String>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        debug_assert!(
            CODES.iter().any(|c| c.code == code),
            "unregistered code {code}"
        );
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            span,
            label: String::new(),
            secondary: Vec::new(),
            help: None,
            notes: Vec::new(),
        }
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, span, message)
        }
    }

    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    pub fn secondary(mut self, span: Span, label: impl Into<String>) -> Self {
        self.secondary.push((span, label.into()));
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    fn to_codespan(&self) -> CsDiagnostic<()> {
        let base = match self.severity {
            Severity::Error => CsDiagnostic::error(),
            Severity::Warning => CsDiagnostic::warning(),
        };
        let mut labels = vec![Label::primary((), self.span.range()).with_message(&self.label)];
        labels.extend(
            self.secondary
                .iter()
                .map(|(span, msg)| Label::secondary((), span.range()).with_message(msg)),
        );
        let mut notes = self.notes.clone();
        if let Some(help) = &self.help {
            notes.push(format!("help: {help}"));
        }
        base.with_code(self.code)
            .with_message(&self.message)
            .with_labels(labels)
            .with_notes(notes)
    }
}

/// Renders diagnostics as text with the file name, line and column, the source
/// line and a caret under the place. `color` adds ANSI colours for a terminal.
pub fn render(file_name: &str, source: &str, diagnostics: &[Diagnostic], color: bool) -> String {
    let file = SimpleFile::new(file_name, source);
    let config = term::Config::default();
    let mut out = String::new();
    for d in diagnostics {
        let cs = d.to_codespan();
        let result = if color {
            render_colored(&config, &file, &cs)
        } else {
            term::emit_into_string(&config, &file, &cs)
        };
        match result {
            Ok(text) => out.push_str(&text),
            // A span outside the file is a bug in a check; still say what went wrong.
            Err(e) => out.push_str(&format!(
                "{}[{}]: {} ({file_name}; location unavailable: {e})\n",
                match d.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                },
                d.code,
                d.message
            )),
        }
    }
    out
}

fn render_colored(
    config: &term::Config,
    file: &SimpleFile<&str, &str>,
    diagnostic: &CsDiagnostic<()>,
) -> Result<String, codespan_reporting::files::Error> {
    use term::termcolor::{Ansi, WriteColor as _};
    let mut buffer = Ansi::new(Vec::new());
    {
        let styles = term::Styles::default();
        let mut writer = term::StylesWriter::new(&mut buffer, &styles);
        term::emit_to_write_style(&mut writer, config, file, diagnostic)?;
    }
    let _ = buffer.reset();
    Ok(String::from_utf8_lossy(&buffer.into_inner()).into_owned())
}

/// A diagnostic code and what it means.
#[derive(Clone, Copy, Debug)]
pub struct CodeInfo {
    pub code: &'static str,
    pub summary: &'static str,
}

macro_rules! codes {
    ($($code:literal => $summary:literal,)*) => {
        /// Every diagnostic the front end can emit.
        pub const CODES: &[CodeInfo] = &[$(CodeInfo { code: $code, summary: $summary },)*];
    };
}

codes! {
    // Lexical and syntax errors.
    "E0001" => "a character or string the lexer cannot read",
    "E0002" => "a syntax error: a token where it cannot stand",
    "E0003" => "the file ends in the middle of a construct",
    "E0004" => "nesting or an expression too deep or too long to be a layer description",
    // Names and structure.
    "E0101" => "an unknown section, field or value name",
    "E0102" => "a name defined twice",
    "E0103" => "a required field or section is missing",
    "E0104" => "a field given a block where a value belongs, or a value where a block belongs",
    "E0105" => "a constant used before it is defined, or defined in terms of itself",
    "E0106" => "a constant named like a keyword value, which would be ambiguous",
    // Values.
    "E0201" => "a value of the wrong type (an integer, number, boolean, name, list or block was expected)",
    "E0202" => "a number outside the range the field allows",
    "E0203" => "a quantity with a missing or wrong unit",
    "E0204" => "arithmetic that overflows, divides by zero, or mixes units wrongly",
    "E0205" => "an integer literal that does not fit in 64 bits",
    // The layer.
    "E0301" => "top_k larger than the number of experts",
    "E0302" => "group-limited routing that is inconsistent (groups kept > groups, experts not divisible by groups, too few experts in the kept groups)",
    "E0303" => "a router option that does not apply to the chosen scoring function",
    "E0304" => "an FFN option that does not apply to the chosen FFN kind",
    "E0305" => "capacity options that are inconsistent",
    // The mesh and placement.
    "E0401" => "the mesh size is not ep × etp × dp",
    "E0402" => "the expert-parallel degree does not divide the number of experts",
    "E0403" => "an explicit placement that misses, repeats or misplaces an expert",
    "E0404" => "a replica that names an unknown expert or rank, or a rank that already holds it",
    "E0405" => "a multi-node mesh without an inter-node link",
    "E0406" => "a tensor-parallel degree that does not divide the expert intermediate size",
    // Sizes.
    "E0501" => "a byte count of the layer that overflows 64 bits",
    // Schedule hints.
    "E0601" => "schedule hints that contradict each other or the layer",
    // Warnings.
    "W0001" => "a setting that is legal but probably not what was meant",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for c in CODES {
            assert!(seen.insert(c.code), "duplicate code {}", c.code);
        }
    }

    #[test]
    fn render_shows_line_column_and_caret() {
        let src = "layer x {\n    hidden = oops\n}\n";
        let d = Diagnostic::error("E0201", Span::new(23, 27), "expected an integer")
            .label("a name")
            .help("write a number");
        let text = render("x.moe", src, &[d], false);
        assert!(text.contains("x.moe:2:14"), "{text}");
        assert!(text.contains("^^^^"), "{text}");
        assert!(text.contains("help: write a number"), "{text}");
    }
}
