//! The canonical formatter behind `moec fmt`.
//!
//! Rules: four-space indentation; one entry per line as `key = value`; a
//! single space around `=` and binary operators; at most one blank line kept
//! between entries; sections separated by one blank line; short `tag { ... }`
//! values and lists on one line, longer ones broken one item per line.
//!
//! Comments are never lost. A comment is printed before the next thing that
//! starts after it ("leading"), or after the thing that ends on its line
//! ("trailing"). A comment inside a value (say, within a multi-line list) is
//! moved above its entry; formatting again leaves it there.

use crate::ast::*;
use crate::diag::Diagnostic;
use crate::lexer::Comment;
use crate::parser::parse;

const INDENT: &str = "    ";
/// Lines longer than this break their lists and tagged values.
const WIDTH: usize = 100;

/// Formats a `.moe` source text. Fails only on syntax errors (which it returns).
pub fn format_source(source: &str) -> Result<String, Vec<Diagnostic>> {
    let parsed = parse(source);
    let file = match (
        parsed.file,
        parsed.diagnostics.iter().any(Diagnostic::is_error),
    ) {
        (Some(file), false) => file,
        _ => {
            return Err(parsed
                .diagnostics
                .into_iter()
                .filter(Diagnostic::is_error)
                .collect())
        }
    };
    let mut f = Formatter {
        src: source,
        comments: parsed.comments,
        next: 0,
        out: String::new(),
        last_end: 0,
    };
    f.file(&file);
    Ok(f.out)
}

struct Formatter<'a> {
    src: &'a str,
    comments: Vec<Comment>,
    /// Index of the first comment not printed yet.
    next: usize,
    out: String,
    /// Source offset of the end of the last thing printed; blank lines are
    /// kept by looking at the source between it and the next thing.
    last_end: usize,
}

impl Formatter<'_> {
    fn file(&mut self, file: &File) {
        let mut first = true;
        let mut prev_section = false;
        for item in &file.items {
            let is_section = matches!(item, Item::Section(_));
            let start = self.leading_start(item.span().start);
            let blank = !first && (is_section || prev_section || self.blank_before(start));
            match item {
                Item::Let(l) => {
                    self.leading(l.span.end, l.span.start, 0, blank, first);
                    let text = format!("let {} = {}", l.name.name, self.value_inline(&l.value));
                    self.line(0, &text);
                    self.trailing(l.span.end);
                }
                Item::Section(s) => {
                    self.leading(s.body.span.start, s.span.start, 0, blank, first);
                    let head = match &s.name {
                        Some(n) => format!("{} {}", s.kind.name, n.name),
                        None => s.kind.name.clone(),
                    };
                    self.block(&head, &s.body, 0);
                }
            }
            first = false;
            prev_section = is_section;
        }
        // Comments after the last item.
        let end = self.src.len() + 1;
        let blank = !first
            && self.next < self.comments.len()
            && self.blank_before(self.comments[self.next].span.start);
        self.leading(end, end, 0, blank, first);
    }

    /// Where the text that belongs to a node starting at `start` begins: its first leading comment, if any.
    fn leading_start(&self, start: usize) -> usize {
        match self.comments.get(self.next) {
            Some(c) if c.span.start < start => c.span.start,
            _ => start,
        }
    }

    /// Whether the source has a blank line between the last printed thing and `pos`.
    fn blank_before(&self, pos: usize) -> bool {
        let from = self.last_end.min(pos);
        self.src
            .get(from..pos)
            .is_some_and(|gap| gap.matches('\n').count() >= 2)
    }

    /// Prints every unprinted comment that starts before `before`, on its own
    /// line, then the blank line the source has before the node at `node_start`.
    fn leading(
        &mut self,
        before: usize,
        node_start: usize,
        depth: usize,
        blank_first: bool,
        at_block_start: bool,
    ) {
        let mut blank = blank_first;
        let mut first = at_block_start;
        let mut printed = false;
        while let Some(c) = self.comments.get(self.next) {
            if c.span.start >= before {
                break;
            }
            let c = c.clone();
            if !first && (blank || self.blank_before(c.span.start)) {
                self.out.push('\n');
            }
            self.line(depth, c.text.trim_end());
            self.last_end = c.span.end;
            self.next += 1;
            blank = false;
            first = false;
            printed = true;
        }
        let gap_after_comments =
            printed && node_start > self.last_end && self.blank_before(node_start);
        if (blank && !first) || gap_after_comments {
            self.out.push('\n');
        }
    }

    /// Appends a comment that starts on the same source line as `end` to the current output line.
    fn trailing(&mut self, end: usize) {
        self.last_end = self.last_end.max(end);
        if let Some(c) = self.comments.get(self.next) {
            let same_line = c.span.start >= end
                && self
                    .src
                    .get(end..c.span.start)
                    .is_some_and(|gap| !gap.contains('\n'));
            if same_line {
                let text = c.text.trim_end().to_string();
                let end_of_comment = c.span.end;
                if self.out.ends_with('\n') {
                    self.out.pop();
                }
                self.out.push(' ');
                self.out.push_str(&text);
                self.out.push('\n');
                self.next += 1;
                self.last_end = end_of_comment;
            }
        }
    }

    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..depth {
            self.out.push_str(INDENT);
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    /// `head {` entries `}`, or `head {}` when empty and comment-free.
    fn block(&mut self, head: &str, block: &Block, depth: usize) {
        let close = block.span.end.saturating_sub(1);
        let has_inner_comment = self
            .comments
            .get(self.next)
            .is_some_and(|c| c.span.start < close);
        if block.entries.is_empty() && !has_inner_comment {
            self.line(depth, &format!("{head} {{}}"));
            self.trailing(block.span.end);
            return;
        }
        self.line(depth, &format!("{head} {{"));
        self.trailing(block.span.start + 1);
        let mut first = true;
        for entry in &block.entries {
            self.entry(entry, depth + 1, first);
            first = false;
        }
        // Comments before the closing brace.
        let blank = !first
            && self.next < self.comments.len()
            && self.comments[self.next].span.start < close
            && self.blank_before(self.comments[self.next].span.start);
        self.leading(close, close, depth + 1, blank, first);
        self.line(depth, "}");
        self.trailing(block.span.end);
    }

    fn entry(&mut self, entry: &Entry, depth: usize, first: bool) {
        let start = self.leading_start(entry.span.start);
        let blank = !first && self.blank_before(start);
        let key = entry.key.text();
        match &entry.body {
            EntryBody::Block(b) => {
                self.leading(b.span.start, entry.span.start, depth, blank, first);
                self.block(key, b, depth);
            }
            EntryBody::Assign(v) => {
                if let ValueKind::Tagged { tag, body } = &v.kind {
                    let inline = self.tagged_inline(tag, body);
                    let text = format!("{key} = {inline}");
                    let fits = depth * INDENT.len() + text.len() <= WIDTH;
                    let inner_comment = self.comments.get(self.next).is_some_and(|c| {
                        c.span.start < body.span.end && c.span.start > body.span.start
                    });
                    if !fits
                        || inner_comment
                        || body
                            .entries
                            .iter()
                            .any(|e| matches!(e.body, EntryBody::Block(_)))
                    {
                        self.leading(body.span.start, entry.span.start, depth, blank, first);
                        self.block(&format!("{key} = {}", tag.name), body, depth);
                        return;
                    }
                }
                self.leading(entry.span.end, entry.span.start, depth, blank, first);
                let inline = format!("{key} = {}", self.value_inline(v));
                if depth * INDENT.len() + inline.len() > WIDTH {
                    if let ValueKind::List(items) = &v.kind {
                        self.line(depth, &format!("{key} = ["));
                        for item in items {
                            self.line(depth + 1, &format!("{},", self.value_inline(item)));
                        }
                        self.line(depth, "]");
                        self.trailing(entry.span.end);
                        return;
                    }
                }
                self.line(depth, &inline);
                self.trailing(entry.span.end);
            }
        }
    }

    fn tagged_inline(&self, tag: &Ident, body: &Block) -> String {
        if body.entries.is_empty() {
            return format!("{} {{}}", tag.name);
        }
        let parts: Vec<String> = body
            .entries
            .iter()
            .map(|e| match &e.body {
                EntryBody::Assign(v) => format!("{} = {}", e.key.text(), self.value_inline(v)),
                EntryBody::Block(_) => format!("{} {{ ... }}", e.key.text()),
            })
            .collect();
        format!("{} {{ {} }}", tag.name, parts.join(", "))
    }

    fn value_inline(&self, v: &Value) -> String {
        match &v.kind {
            ValueKind::Expr { expr, unit } => {
                let mut s = expr_text(expr);
                if let Some(u) = unit {
                    s.push(' ');
                    s.push_str(&u.name);
                }
                s
            }
            ValueKind::Tagged { tag, body } => self.tagged_inline(tag, body),
            ValueKind::List(items) => {
                let parts: Vec<String> = items.iter().map(|i| self.value_inline(i)).collect();
                format!("[{}]", parts.join(", "))
            }
        }
    }
}

fn expr_text(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Int(t) | ExprKind::Float(t) | ExprKind::Name(t) => t.clone(),
        ExprKind::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Neg(inner) => format!("-{}", expr_text(inner)),
        ExprKind::Binary(op, a, b) => format!("{} {} {}", expr_text(a), op.symbol(), expr_text(b)),
        ExprKind::Paren(inner) => format!("({})", expr_text(inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(src: &str) -> String {
        format_source(src).expect("formats")
    }

    #[test]
    fn normalises_layout() {
        let src = "layer   x{hidden=4096 ,dtype=bf16\n\n\n\n tokens_per_rank=2*  1024}\nmesh{device=H100{memory=96 GB,nvlink=450GB/s}}";
        let out = fmt(src);
        assert_eq!(
            out,
            "layer x {\n    hidden = 4096\n    dtype = bf16\n\n    tokens_per_rank = 2 * 1024\n}\n\nmesh {\n    device = H100 { memory = 96 GB, nvlink = 450 GB/s }\n}\n"
        );
        assert_eq!(fmt(&out), out);
    }

    #[test]
    fn keeps_every_comment() {
        let src = "// head\nlet a = 1 // one\n\n// before layer\nlayer x { // open\n  // inside\n  hidden = [1, // in list\n 2]\n  // before close\n} // after close\n// tail\n";
        let out = fmt(src);
        for c in [
            "// head",
            "// one",
            "// before layer",
            "// open",
            "// inside",
            "// in list",
            "// before close",
            "// after close",
            "// tail",
        ] {
            assert!(out.contains(c), "lost {c}:\n{out}");
        }
        assert_eq!(fmt(&out), out, "not idempotent:\n{out}");
    }

    #[test]
    fn breaks_long_lists() {
        let items: Vec<String> = (0..60).map(|i| i.to_string()).collect();
        let src = format!(
            "mesh {{ placement = explicit {{ 0 = [{}] }} }}",
            items.join(", ")
        );
        let out = fmt(&src);
        assert!(
            out.contains("    placement = explicit {\n        0 = [\n            0,\n"),
            "{out}"
        );
        assert_eq!(fmt(&out), out);
    }

    #[test]
    fn strings_round_trip() {
        let out = fmt("let label = \"a \\\"q\\\" \\\\ b\"");
        assert_eq!(out, "let label = \"a \\\"q\\\" \\\\ b\"\n");
        assert_eq!(fmt(&out), out);
    }

    #[test]
    fn syntax_errors_are_returned() {
        assert!(format_source("layer x { hidden = }").is_err());
    }
}
