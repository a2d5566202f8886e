//! Parsing: tokens to [`ast::File`], with every syntax error reported.

use crate::ast;
use crate::diag::Diagnostic;
use crate::lexer::{lex, Comment, Token};
use crate::span::Span;
use lalrpop_util::{lalrpop_mod, ErrorRecovery, ParseError};

lalrpop_mod!(
    #[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, unused_parens)]
    grammar
);

/// Deepest nesting of `{`, `[` and `(` a file may use. Real layers nest three
/// or four levels; the bound keeps every recursive pass over the tree far from
/// the stack limit whatever the input.
pub const MAX_NESTING: usize = 32;
/// Most operators in one value. Bounds the depth of an expression tree.
pub const MAX_OPERATORS: usize = 256;

/// A parsed file, the comments beside it, and what went wrong.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The tree; present even when there were (recovered) errors.
    pub file: Option<ast::File>,
    pub comments: Vec<Comment>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Parsed {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Parses a whole `.moe` file. Never panics; returns every lexical and syntax error.
pub fn parse(source: &str) -> Parsed {
    let lexed = lex(source);
    let mut diagnostics = Vec::new();
    for (token, span) in &lexed.tokens {
        if let Token::Error(text) = token {
            diagnostics.push(lex_error(text, *span));
        }
    }
    if let Some(d) = check_bounds(&lexed.tokens) {
        diagnostics.push(d);
        return Parsed {
            file: None,
            comments: lexed.comments,
            diagnostics,
        };
    }

    let mut recovered: Vec<ErrorRecovery<usize, Token, ()>> = Vec::new();
    let tokens = lexed
        .tokens
        .iter()
        .cloned()
        .map(|(t, s)| Ok::<_, ()>((s.start, t, s.end)));
    let result = grammar::FileParser::new().parse(&mut recovered, tokens);
    let eof = Span::new(source.len(), source.len());
    for r in recovered {
        if let Some(d) = syntax_error(r.error, eof) {
            diagnostics.push(d);
        }
    }
    let file = match result {
        Ok(file) => Some(file),
        Err(e) => {
            if let Some(d) = syntax_error(e, eof) {
                diagnostics.push(d);
            }
            None
        }
    };
    // An early end of file is most often an unclosed bracket: show which.
    if let Some((open, span)) = innermost_unclosed(&lexed.tokens) {
        for d in diagnostics.iter_mut().filter(|d| d.code == "E0003") {
            d.secondary
                .push((span, format!("this `{open}` is never closed")));
            d.help = Some(format!("close it with `{}`", closer(open)));
        }
    }
    // Recovery can report the same place twice; keep the first of each.
    diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
    diagnostics.dedup_by(|a, b| a.span == b.span && a.code == b.code);
    Parsed {
        file,
        comments: lexed.comments,
        diagnostics,
    }
}

fn lex_error(text: &str, span: Span) -> Diagnostic {
    if text.starts_with('"') {
        return Diagnostic::error("E0001", span, "unterminated string")
            .label("this string has no closing `\"` on its line")
            .help("strings end on the line they start; close it with `\"`");
    }
    let shown: String = text.chars().take(16).collect();
    let mut d = Diagnostic::error(
        "E0001",
        span,
        format!(
            "unexpected character{} `{}`",
            plural(text.chars().count()),
            shown.escape_debug()
        ),
    )
    .label("not part of the .moe language");
    if text.starts_with('#') {
        d = d.help("comments start with `//`");
    } else if text.starts_with(';') || text.starts_with(':') {
        d = d.help("entries are written `name = value`, one per line or separated by `,`");
    }
    d
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The last opening bracket left unclosed at the end of the file.
fn innermost_unclosed(tokens: &[(Token, Span)]) -> Option<(char, Span)> {
    let mut stack: Vec<(char, Span)> = Vec::new();
    for (token, span) in tokens {
        match token {
            Token::LBrace => stack.push(('{', *span)),
            Token::LBracket => stack.push(('[', *span)),
            Token::LParen => stack.push(('(', *span)),
            Token::RBrace | Token::RBracket | Token::RParen => {
                stack.pop();
            }
            _ => {}
        }
    }
    stack.pop()
}

fn closer(open: char) -> char {
    match open {
        '{' => '}',
        '[' => ']',
        _ => ')',
    }
}

/// Rejects inputs whose trees would be absurdly deep before building them.
fn check_bounds(tokens: &[(Token, Span)]) -> Option<Diagnostic> {
    let mut depth = 0usize;
    let mut operators = 0usize;
    for (token, span) in tokens {
        match token {
            Token::LBrace | Token::LBracket | Token::LParen => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(
                        Diagnostic::error(
                            "E0004",
                            *span,
                            format!("nesting deeper than {MAX_NESTING} levels"),
                        )
                        .label("too deep"),
                    );
                }
            }
            Token::RBrace | Token::RBracket | Token::RParen => depth = depth.saturating_sub(1),
            _ => {}
        }
        match token {
            Token::Plus | Token::Minus | Token::Star | Token::Slash => {
                operators += 1;
                if operators > MAX_OPERATORS {
                    return Some(
                        Diagnostic::error(
                            "E0004",
                            *span,
                            format!("a value with more than {MAX_OPERATORS} operators"),
                        )
                        .label("expression too long"),
                    );
                }
            }
            Token::Eq | Token::Comma | Token::LBrace | Token::RBrace => operators = 0,
            _ => {}
        }
    }
    None
}

fn syntax_error(error: ParseError<usize, Token, ()>, eof: Span) -> Option<Diagnostic> {
    match error {
        ParseError::InvalidToken { location } => Some(
            Diagnostic::error("E0001", Span::new(location, location), "invalid token")
                .label("here"),
        ),
        ParseError::UnrecognizedEof { expected, .. } => Some(
            Diagnostic::error("E0003", eof, "the file ends too early")
                .label(format!("expected {}", describe_expected(&expected)))
                .help("a value may be missing at the end of the file"),
        ),
        ParseError::UnrecognizedToken {
            token: (l, token, r),
            expected,
        } => {
            // Already reported by the lexer.
            if matches!(token, Token::Error(_)) {
                return None;
            }
            let span = Span::new(l, r);
            let mut d =
                Diagnostic::error("E0002", span, format!("unexpected {}", token.describe()))
                    .label(format!("expected {}", describe_expected(&expected)));
            if let Some(help) = hint_for(&token, &expected) {
                d = d.help(help);
            }
            Some(d)
        }
        ParseError::ExtraToken {
            token: (l, token, r),
        } => {
            if matches!(token, Token::Error(_)) {
                return None;
            }
            Some(
                Diagnostic::error(
                    "E0002",
                    Span::new(l, r),
                    format!("unexpected {}", token.describe()),
                )
                .label("nothing may follow here"),
            )
        }
        ParseError::User { .. } => None,
    }
}

fn hint_for(token: &Token, expected: &[String]) -> Option<String> {
    let expects = |t: &str| expected.iter().any(|e| e == t);
    match token {
        Token::Unit(u) if expects("IDENT") => Some(format!(
            "`{u}` is a unit and cannot be used as a name; units follow a number, as in `3 {u}`"
        )),
        Token::Ident(_) if expects("\"=\"") => {
            Some("an entry is written `name = value` or `name { ... }`".to_string())
        }
        Token::Eq if expects("\"{\"") => Some(
            "sections are written `layer NAME { ... }`, `mesh { ... }` or `schedule { ... }`"
                .to_string(),
        ),
        _ => None,
    }
}

/// Turns lalrpop's terminal names into words.
fn describe_expected(expected: &[String]) -> String {
    let mut words: Vec<&str> = Vec::new();
    for e in expected {
        let word = match e.as_str() {
            "IDENT" => "a name",
            "INT" => "an integer",
            "FLOAT" => "a number",
            "STR" => "a string",
            "UNIT" => "a unit",
            "ERROR" => continue,
            "\"let\"" => "`let`",
            "\"true\"" | "\"false\"" => "`true` or `false`",
            "\"=\"" => "`=`",
            "\",\"" => "`,`",
            "\"{\"" => "`{`",
            "\"}\"" => "`}`",
            "\"[\"" => "`[`",
            "\"]\"" => "`]`",
            "\"(\"" => "`(`",
            "\")\"" => "`)`",
            "\"+\"" | "\"-\"" | "\"*\"" | "\"/\"" => "an operator",
            other => other,
        };
        if !words.contains(&word) {
            words.push(word);
        }
    }
    match words.len() {
        0 => "something else".to_string(),
        1 => words[0].to_string(),
        _ => {
            let (last, rest) = words
                .split_last()
                .map(|(l, r)| (*l, r))
                .unwrap_or(("", &[]));
            format!("{} or {}", rest.join(", "), last)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_entries_and_values() {
        let src = r#"
            let H = 4096
            layer demo {
                hidden = 2 * H
                router { top_k = 2, scoring = softmax }
                capacity = dropless
            }
            mesh {
                device = H100 { memory = 96 GB }
                intra_node { bandwidth = 450 GB/s latency = 3 us }
                placement = explicit { 0 = [0, 1] 1 = [2, 3] }
            }
        "#;
        let parsed = parse(src);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let file = parsed.file.expect("a tree");
        assert_eq!(file.items.len(), 3);
    }

    #[test]
    fn reports_several_syntax_errors_in_one_run() {
        let src = "layer a {\n hidden = = 3\n top_k = }\n dtype = bf16\n}\nmesh { ep = 1 }\n";
        let parsed = parse(src);
        let syntax: Vec<_> = parsed
            .diagnostics
            .iter()
            .filter(|d| d.code == "E0002")
            .collect();
        assert!(syntax.len() >= 2, "{:?}", parsed.diagnostics);
    }

    #[test]
    fn deep_nesting_is_rejected_not_overflowed() {
        let src = format!("let a = {}1{}", "(".repeat(10_000), ")".repeat(10_000));
        let parsed = parse(&src);
        assert!(parsed.diagnostics.iter().any(|d| d.code == "E0004"));
    }

    #[test]
    fn long_expressions_are_rejected() {
        let src = format!("let a = 1{}", " + 1".repeat(10_000));
        let parsed = parse(&src);
        assert!(parsed.diagnostics.iter().any(|d| d.code == "E0004"));
    }

    #[test]
    fn unclosed_block_is_an_eof_error() {
        let parsed = parse("layer a {\n hidden = 3\n");
        assert!(parsed.diagnostics.iter().any(|d| d.code == "E0003"));
    }
}
