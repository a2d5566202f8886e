//! The `.moe` lexer, built with logos.
//!
//! The lexer never drops a position: a character it does not recognise becomes
//! a [`Token::Error`] with its span, and comments are kept (as [`Comment`]s) so
//! that the formatter can put them back.

use crate::span::Span;
use logos::Logos;

/// Tokens of the `.moe` language.
///
/// Units (`GB/s`, `us`, ...) are tokens of their own rather than identifiers,
/// which keeps the grammar LR(1) although entries need no separators: after a
/// number, a unit token continues the value and an identifier starts the next
/// entry.
#[derive(Logos, Clone, Debug, PartialEq)]
#[logos(skip r"[ \t\r\n\f]+")]
pub enum Token {
    #[token("let")]
    Let,
    #[token("true")]
    True,
    #[token("false")]
    False,

    #[regex(r"[A-Za-z_][A-Za-z0-9_]*", |lex| lex.slice().to_string(), priority = 1)]
    Ident(String),

    /// An integer literal as written (digits and `_`); its value is read by the checker,
    /// which can then report a literal that does not fit with its span.
    #[regex(r"[0-9][0-9_]*", |lex| lex.slice().to_string())]
    Int(String),

    #[regex(r"[0-9][0-9_]*\.[0-9][0-9_]*([eE][+-]?[0-9]+)?", |lex| lex.slice().to_string())]
    #[regex(r"[0-9][0-9_]*[eE][+-]?[0-9]+", |lex| lex.slice().to_string())]
    Float(String),

    /// A double-quoted string; escapes are `\"` and `\\`.
    #[regex(r#""([^"\\\n]|\\["\\])*""#, |lex| unescape(lex.slice()))]
    Str(String),

    #[regex(r"B|KB|MB|GB|TB|KiB|MiB|GiB|TiB", |lex| lex.slice().to_string(), priority = 3)]
    #[regex(r"B/s|KB/s|MB/s|GB/s|TB/s|KiB/s|MiB/s|GiB/s|Kb/s|Mb/s|Gb/s|Tb/s", |lex| lex.slice().to_string(), priority = 3)]
    #[regex(r"ns|us|µs|ms|s", |lex| lex.slice().to_string(), priority = 3)]
    #[regex(r"GFLOP/s|TFLOP/s|PFLOP/s", |lex| lex.slice().to_string(), priority = 3)]
    Unit(String),

    // A line comment runs to the end of its line by definition, so the greedy match is intended.
    #[regex(r"//[^\n]*", |lex| lex.slice().to_string(), allow_greedy = true)]
    Comment(String),

    #[token("=")]
    Eq,
    #[token(",")]
    Comma,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,

    /// Text the lexer could not read: an unknown character or an unterminated string.
    /// Never produced by logos itself; the [`lex`] function turns logos' errors into it.
    Error(String),
}

impl Token {
    /// How the token is named in diagnostics.
    pub fn describe(&self) -> String {
        match self {
            Token::Let => "`let`".into(),
            Token::True => "`true`".into(),
            Token::False => "`false`".into(),
            Token::Ident(s) => format!("identifier `{s}`"),
            Token::Int(s) => format!("integer `{s}`"),
            Token::Float(s) => format!("number `{s}`"),
            Token::Str(_) => "a string".into(),
            Token::Unit(s) => format!("unit `{s}`"),
            Token::Comment(_) => "a comment".into(),
            Token::Eq => "`=`".into(),
            Token::Comma => "`,`".into(),
            Token::LBrace => "`{`".into(),
            Token::RBrace => "`}`".into(),
            Token::LBracket => "`[`".into(),
            Token::RBracket => "`]`".into(),
            Token::LParen => "`(`".into(),
            Token::RParen => "`)`".into(),
            Token::Plus => "`+`".into(),
            Token::Minus => "`-`".into(),
            Token::Star => "`*`".into(),
            Token::Slash => "`/`".into(),
            Token::Error(s) => format!("`{}`", s.escape_debug()),
        }
    }
}

fn unescape(quoted: &str) -> String {
    let inner = &quoted[1..quoted.len() - 1];
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A comment as written, with its span; kept aside for the formatter.
#[derive(Clone, Debug, PartialEq)]
pub struct Comment {
    pub text: String,
    pub span: Span,
}

/// The result of lexing one file.
#[derive(Clone, Debug, Default)]
pub struct Lexed {
    /// Every token but comments, in order, with byte spans; includes [`Token::Error`]s.
    pub tokens: Vec<(Token, Span)>,
    pub comments: Vec<Comment>,
}

/// Splits `source` into tokens. Never fails: unreadable text becomes [`Token::Error`].
pub fn lex(source: &str) -> Lexed {
    let mut out = Lexed::default();
    let mut lexer = Token::lexer(source);
    while let Some(result) = lexer.next() {
        let span = Span::from(lexer.span());
        match result {
            Ok(Token::Comment(text)) => out.comments.push(Comment { text, span }),
            Ok(token) => out.tokens.push((token, span)),
            Err(()) => {
                let text = lexer.slice().to_string();
                // Merge adjacent error characters into one token so that a run of
                // garbage gives one diagnostic, not one per byte.
                match out.tokens.last_mut() {
                    Some((Token::Error(prev), prev_span)) if prev_span.end == span.start => {
                        prev.push_str(&text);
                        prev_span.end = span.end;
                    }
                    _ => out.tokens.push((Token::Error(text), span)),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Token> {
        lex(src).tokens.into_iter().map(|(t, _)| t).collect()
    }

    #[test]
    fn units_are_their_own_tokens() {
        assert_eq!(
            kinds("bandwidth = 450 GB/s"),
            vec![
                Token::Ident("bandwidth".into()),
                Token::Eq,
                Token::Int("450".into()),
                Token::Unit("GB/s".into())
            ]
        );
        assert_eq!(kinds("3 us")[1], Token::Unit("us".into()));
        // An identifier that merely starts like a unit stays an identifier.
        assert_eq!(kinds("scale")[0], Token::Ident("scale".into()));
        assert_eq!(kinds("GBx")[0], Token::Ident("GBx".into()));
    }

    #[test]
    fn numbers() {
        assert_eq!(kinds("14_336")[0], Token::Int("14_336".into()));
        assert_eq!(kinds("2.5")[0], Token::Float("2.5".into()));
        assert_eq!(kinds("1e-3")[0], Token::Float("1e-3".into()));
    }

    #[test]
    fn bad_characters_keep_their_span() {
        let lexed = lex("hidden = 40$$96");
        let errors: Vec<_> = lexed
            .tokens
            .iter()
            .filter(|(t, _)| matches!(t, Token::Error(_)))
            .collect();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, Token::Error("$$".into()));
        assert_eq!(errors[0].1, Span::new(11, 13));
    }

    #[test]
    fn comments_are_kept_aside() {
        let lexed = lex("a = 1 // one\n// two\nb = 2");
        assert_eq!(lexed.comments.len(), 2);
        assert_eq!(lexed.comments[0].text, "// one");
        assert_eq!(lexed.tokens.len(), 6);
    }

    #[test]
    fn unterminated_string_is_an_error_token() {
        let lexed = lex("name = \"abc");
        assert!(lexed
            .tokens
            .iter()
            .any(|(t, _)| matches!(t, Token::Error(_))));
    }
}
