//! The syntax tree of a `.moe` file. Every node carries its [`Span`].
//!
//! The tree is deliberately generic (sections of entries, entries of values):
//! the parser accepts any well-formed file, and the checker ([`crate::check`])
//! decides which names and values mean something. That split lets the checker
//! report every unknown or misplaced name in one run, with a suggestion.

use crate::span::Span;

/// A whole file: `let` constants and sections (`layer`, `mesh`, `schedule`).
#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// `let NAME = value`
    Let(Let),
    /// `kind [name] { entries }`, e.g. `layer mixtral { ... }` or `mesh { ... }`.
    Section(Section),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Let(l) => l.span,
            Item::Section(s) => s.span,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Let {
    pub name: Ident,
    pub value: Value,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Section {
    pub kind: Ident,
    pub name: Option<Ident>,
    pub body: Block,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// `{ entry entry ... }`; `span` covers the braces.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub entries: Vec<Entry>,
    pub span: Span,
}

/// One line of a block: `key = value` or `key { ... }`.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: Key,
    pub body: EntryBody,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum EntryBody {
    Assign(Value),
    Block(Block),
}

/// An entry's key: a name, or an index (`0 = [0, 1]` in an explicit placement).
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub kind: KeyKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum KeyKind {
    Name(String),
    /// The literal as written; the checker reads its value.
    Index(String),
}

impl Key {
    /// The key as written.
    pub fn text(&self) -> &str {
        match &self.kind {
            KeyKind::Name(s) | KeyKind::Index(s) => s,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueKind {
    /// An expression with an optional unit: `4096`, `2 * H`, `450 GB/s`.
    Expr { expr: Expr, unit: Option<Unit> },
    /// A name with options: `H100 { memory = 96 GB }`, `explicit { 0 = [0] }`.
    Tagged { tag: Ident, body: Block },
    /// `[a, b, c]`
    List(Vec<Value>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// An integer literal as written (may contain `_`).
    Int(String),
    /// A decimal literal as written.
    Float(String),
    Str(String),
    Bool(bool),
    /// A name: a `let` constant or a keyword value such as `swiglu` or `auto`.
    Name(String),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Paren(Box<Expr>),
}

impl Value {
    /// The name if this value is a bare identifier (`swiglu`, `auto`, ...).
    pub fn as_name(&self) -> Option<&str> {
        match &self.kind {
            ValueKind::Expr {
                expr:
                    Expr {
                        kind: ExprKind::Name(n),
                        ..
                    },
                unit: None,
            } => Some(n),
            _ => None,
        }
    }
}
