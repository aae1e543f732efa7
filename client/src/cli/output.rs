//! Output: aligned tables for people, JSON lines for programs (pure formatting).

use std::borrow::Cow;
use std::io::IsTerminal;

use comfy_table::{ContentArrangement, Table, TableComponent, presets};
use serde_json::{Map, Value};

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Aligned table (the default on a terminal).
    Table,
    /// One JSON object per line (the default when piped, or with --json).
    Json,
}

/// `--output auto|table|json` resolved against whether stdout is a terminal.
pub fn resolve(choice: Option<Format>) -> Format {
    choice.unwrap_or_else(|| {
        if std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        }
    })
}

/// Widest cell in a table before it is cut with `…` (`--wide` keeps everything).
pub const MAX_CELL: usize = 48;

/// `s` with its control characters shown, not obeyed: a newline as `⏎`, the other C0
/// controls as their Unicode pictures (`␛` for ESC, `␉` for a tab), DEL as `␡`, C1 controls
/// as `�`. Event and row text comes from any producer or writer, and an escape sequence sent
/// to the terminal as it is could retitle it, clear it or hide text.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    s.chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\0'..='\x1f' => char::from_u32(0x2400 + c as u32).unwrap_or('�'),
            '\x7f' => '␡',
            c if c.is_control() => '�',
            c => c,
        })
        .collect()
}

/// A cell's text: strings as they are (control characters shown as [`printable`]), null as
/// empty, everything else as JSON.
pub fn cell(v: &Value, wide: bool) -> String {
    let s = match v {
        Value::Null => String::new(),
        Value::String(s) => printable(s).into_owned(),
        other => other.to_string(),
    };
    if wide || s.chars().count() <= MAX_CELL {
        s
    } else {
        let mut cut: String = s.chars().take(MAX_CELL - 1).collect();
        cut.push('…');
        cut
    }
}

/// Column order: `preferred` first (those present), then any others alphabetically.
pub fn columns(rows: &[Map<String, Value>], preferred: &[String]) -> Vec<String> {
    let mut cols: Vec<String> = preferred
        .iter()
        .filter(|c| rows.is_empty() || rows.iter().any(|r| r.contains_key(*c)))
        .cloned()
        .collect();
    let mut rest: Vec<String> = rows
        .iter()
        .flat_map(|r| r.keys())
        .filter(|k| !cols.contains(k))
        .cloned()
        .collect();
    rest.sort();
    rest.dedup();
    cols.extend(rest);
    cols
}

/// An aligned table of `rows` (no trailing newline).
pub fn table(rows: &[Map<String, Value>], cols: &[String], wide: bool) -> String {
    let mut t = Table::new();
    // psql-like: no borders, one rule under the header.
    t.load_preset(presets::NOTHING)
        .set_style(TableComponent::HeaderLines, '─')
        .set_style(TableComponent::MiddleHeaderIntersections, '─')
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(cols.iter().map(|c| printable(c)));
    for r in rows {
        t.add_row(
            cols.iter()
                .map(|c| cell(r.get(c).unwrap_or(&Value::Null), wide)),
        );
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Key/value pairs as a two-column table.
pub fn pairs(items: &[(&str, String)]) -> String {
    let width = items.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    items
        .iter()
        .map(|(k, v)| format!("{k:>width$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// "1 row" / "3 rows".
pub fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        let hostile = "a\nb\r\x1b[2J\x1b]0;owned\x07\tz\x7f\u{9b}1m";
        let shown = printable(hostile);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(shown, "a⏎b␍␛[2J␛]0;owned␇␉z␡�1m");
        assert!(matches!(printable("plain ✓"), Cow::Borrowed("plain ✓")));
        let rows = [row(json!({"\x1b[31mred": hostile}))];
        let cols = columns(&rows, &[]);
        let t = table(&rows, &cols, true);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tables_are_aligned_in_the_preferred_order() {
        let rows = vec![
            row(json!({"id": 1, "agent_name": "coder", "extra": null})),
            row(json!({"id": 22, "agent_name": "a", "extra": {"k": true}})),
        ];
        let cols = columns(&rows, &["id".into(), "agent_name".into(), "missing".into()]);
        assert_eq!(cols, vec!["id", "agent_name", "extra"]);
        let out = table(&rows, &cols, false);
        let lines: Vec<&str> = out.lines().collect();
        let header = lines.iter().find(|l| l.contains("agent_name")).unwrap();
        let first = lines.iter().find(|l| l.contains("coder")).unwrap();
        let second = lines.iter().find(|l| l.contains("{\"k\":true}")).unwrap();
        // Columns line up: each value starts where its header does.
        let col = header.find("agent_name").unwrap();
        assert_eq!(first.find("coder").unwrap(), col);
        assert_eq!(
            second
                .char_indices()
                .position(|(i, _)| i == second.find(" a ").unwrap() + 1)
                .unwrap(),
            header.char_indices().position(|(i, _)| i == col).unwrap()
        );
    }

    #[test]
    fn long_cells_are_cut_unless_wide() {
        let long = Value::String("x".repeat(100));
        assert_eq!(cell(&long, false).chars().count(), MAX_CELL);
        assert!(cell(&long, false).ends_with('…'));
        assert_eq!(cell(&long, true).len(), 100);
        assert_eq!(cell(&Value::Null, false), "");
        assert_eq!(cell(&json!(1.5), false), "1.5");
    }

    #[test]
    fn plurals() {
        assert_eq!(plural(1, "row"), "1 row");
        assert_eq!(plural(0, "row"), "0 rows");
    }
}
