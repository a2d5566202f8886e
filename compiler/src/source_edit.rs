//! Editing a `.moe` file's text the way a user would: entries of one
//! section replaced, the rest (comments included) kept, the result in the
//! canonical form `moec fmt` prints and checked again. `moec place` and
//! `moec tune` write their files through it.

use moec_lang::ast::Item;

/// `source` with the entries named `remove` of the section `section`
/// (`layer`, `mesh` or `schedule`) cut and `add` (entries, one per line)
/// appended to it, formatted.
pub fn replace_entries(
    source: &str,
    section: &str,
    remove: &[&str],
    add: &str,
) -> Result<String, String> {
    let parsed = moec_lang::parser::parse(source);
    let file = parsed
        .file
        .ok_or("the file does not parse; run `moec check` on it")?;
    let block = file
        .items
        .iter()
        .find_map(|item| match item {
            Item::Section(s) if s.kind.name == section => Some(&s.body),
            _ => None,
        })
        .ok_or_else(|| format!("the file has no {section} section"))?;
    let mut text = source.to_string();
    // The new entries go last in the block (before its closing brace), then
    // the old ones are cut, from the end back, so no offset moves under us.
    let close = block.span.end.saturating_sub(1);
    if source.get(close..close + 1) != Some("}") {
        return Err(format!(
            "the {section} section's closing brace is not where the parser says"
        ));
    }
    text.insert_str(close, &format!("\n{add}"));
    let mut cuts: Vec<(usize, usize)> = block
        .entries
        .iter()
        .filter(|e| remove.contains(&e.key.text()))
        .map(|e| (e.span.start, e.span.end))
        .collect();
    cuts.sort_unstable();
    for &(start, end) in cuts.iter().rev() {
        text.replace_range(start..end, "");
    }
    moec_lang::format_source(&text).map_err(|d| {
        format!(
            "the edited file does not parse ({})",
            d.first().map_or(String::new(), |d| d.message.clone())
        )
    })
}

/// `text` if it checks, or the first error's message.
pub fn checked(text: &str) -> Result<String, String> {
    let checked = moec_lang::check_source(text);
    if checked.program.is_some() {
        return Ok(text.to_string());
    }
    let first = checked
        .diagnostics
        .iter()
        .find(|d| d.is_error())
        .map_or(String::new(), |d| d.message.clone());
    Err(format!("the edited file does not check: {first}"))
}
