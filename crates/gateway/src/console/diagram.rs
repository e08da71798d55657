//! A task's workflow diagram as SVG, drawn from the configuration: one box
//! per state, in columns by distance from the initial state; an arrow per
//! transition. Marks: `reverify` states (the token rotates on entry),
//! states whose entry needs approval, final states (double border), the
//! task's current state (highlighted), and the transitions the task took
//! (drawn bold, from its `state.transition` audit records).
//!
//! Every name is escaped; the SVG carries no script and no inline style
//! (colours come from classes in `console.css`), so it lives under the
//! console's Content-Security-Policy.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;

use portcullis_config::AgentType;

const BOX_W: i64 = 136;
const BOX_H: i64 = 44;
const COL: i64 = 184;
const ROW: i64 = 84;
const PAD: i64 = 24;
/// Most states drawn (a configuration with more is cut, and says so).
const MAX_STATES: usize = 64;

/// Escapes text for SVG/XML content and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The diagram of `workflow`, with `current` highlighted and the
/// transitions in `taken` (from, to) drawn as taken.
pub(crate) fn render(
    workflow: &AgentType,
    current: &str,
    taken: &BTreeSet<(String, String)>,
) -> String {
    let states: Vec<&portcullis_config::State> = workflow.states.iter().take(MAX_STATES).collect();
    // Columns: breadth-first distance from the initial state; states it
    // cannot reach go in a last column.
    let mut column: HashMap<&str, i64> = HashMap::new();
    let mut queue = VecDeque::new();
    column.insert(workflow.initial.as_str(), 0);
    queue.push_back(workflow.initial.as_str());
    while let Some(name) = queue.pop_front() {
        let depth = column.get(name).copied().unwrap_or(0);
        if let Some(s) = states.iter().find(|s| s.name == name) {
            for next in &s.next {
                if !column.contains_key(next.as_str()) && states.iter().any(|s| &s.name == next) {
                    column.insert(next.as_str(), depth + 1);
                    queue.push_back(next.as_str());
                }
            }
        }
    }
    let last = column.values().copied().max().unwrap_or(0) + 1;
    let mut rows: HashMap<i64, i64> = HashMap::new();
    let mut at: HashMap<&str, (i64, i64)> = HashMap::new();
    for s in &states {
        let c = column.get(s.name.as_str()).copied().unwrap_or(last);
        let r = rows.entry(c).or_insert(0);
        at.insert(s.name.as_str(), (PAD + c * COL, PAD + 20 + *r * ROW));
        *r += 1;
    }
    let width = at
        .values()
        .map(|(x, _)| x + BOX_W + PAD)
        .max()
        .unwrap_or(200);
    let height = at
        .values()
        .map(|(_, y)| y + BOX_H + PAD + 18)
        .max()
        .unwrap_or(120);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="workflow" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-label="workflow of agent type {}">"#,
        escape(&workflow.name)
    );
    svg.push_str(r#"<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="10" markerHeight="10" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker><marker id="arrow-taken" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="10" markerHeight="10" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead taken"/></marker></defs>"#);
    // Edges first, under the boxes.
    for s in &states {
        let Some(&(x1, y1)) = at.get(s.name.as_str()) else {
            continue;
        };
        for next in &s.next {
            let Some(&(x2, y2)) = at.get(next.as_str()) else {
                continue;
            };
            let was_taken = taken.contains(&(s.name.clone(), next.clone()));
            let (class, marker) = if was_taken {
                ("edge taken", "arrow-taken")
            } else {
                ("edge", "arrow")
            };
            let path = if x2 == x1 {
                // Same column: a straight line between the boxes, off
                // centre so it clears the marks under the upper one.
                let x = x1 + BOX_W * 3 / 4;
                if y2 > y1 {
                    format!("M {x} {} L {x} {}", y1 + BOX_H, y2)
                } else {
                    format!("M {x} {} L {x} {}", y1, y2 + BOX_H)
                }
            } else if x2 > x1 {
                format!(
                    "M {} {} C {} {}, {} {}, {} {}",
                    x1 + BOX_W,
                    y1 + BOX_H / 2,
                    x1 + BOX_W + 24,
                    y1 + BOX_H / 2,
                    x2 - 24,
                    y2 + BOX_H / 2,
                    x2,
                    y2 + BOX_H / 2
                )
            } else {
                // Back to an earlier column: a loop under the boxes.
                let low = y1.max(y2) + BOX_H + 16;
                format!(
                    "M {} {} C {} {}, {} {}, {} {}",
                    x1 + BOX_W / 2,
                    y1 + BOX_H,
                    x1 + BOX_W / 2,
                    low,
                    x2 + BOX_W / 2,
                    low,
                    x2 + BOX_W / 2,
                    y2 + BOX_H
                )
            };
            let _ = write!(
                svg,
                r#"<path d="{path}" class="{class}" marker-end="url(#{marker})"><title>{} → {}{}</title></path>"#,
                escape(&s.name),
                escape(next),
                if was_taken { " (taken)" } else { "" }
            );
        }
    }
    for s in &states {
        let Some(&(x, y)) = at.get(s.name.as_str()) else {
            continue;
        };
        let needs_approval = s.approval || (workflow.approval && s.reverify);
        let mut class = String::from("state");
        if s.name == current {
            class.push_str(" current");
        }
        if s.is_final {
            class.push_str(" final");
        }
        if s.name == workflow.initial {
            class.push_str(" initial");
        }
        let _ = write!(
            svg,
            r#"<g class="{class}"><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8"/>"#
        );
        if s.is_final {
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{}" width="{}" height="{}" rx="6" class="inner"/>"#,
                x + 4,
                y + 4,
                BOX_W - 8,
                BOX_H - 8
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="name">{}</text>"#,
            x + BOX_W / 2,
            y + BOX_H / 2 + 5,
            escape(&s.name)
        );
        let mut marks = Vec::new();
        if s.reverify {
            marks.push("↻ reverify");
        }
        if needs_approval {
            marks.push("◆ approval");
        }
        if s.name == current {
            marks.push("● now");
        }
        if !marks.is_empty() {
            let _ = write!(
                svg,
                r#"<text x="{}" y="{}" class="mark">{}</text>"#,
                x + BOX_W / 2,
                y + BOX_H + 14,
                marks.join("  ")
            );
        }
        let _ = write!(
            svg,
            "<title>{}: tools {}</title></g>",
            escape(&s.name),
            escape(&s.tools.join(", "))
        );
    }
    if workflow.states.len() > MAX_STATES {
        let _ = write!(
            svg,
            r#"<text x="{PAD}" y="14" class="mark">only the first {MAX_STATES} states are drawn</text>"#
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn workflow() -> AgentType {
        let text = r#"
name = "ingestion"
initial = "connect"
states = [
  { name = "connect", tools = ["a"], next = ["validate"] },
  { name = "validate", tools = ["b"], next = ["write", "connect"] },
  { name = "write", tools = ["c"], next = ["done"], reverify = true, approval = true },
  { name = "done", final = true },
]
"#;
        toml::from_str(text).unwrap()
    }

    #[test]
    fn marks_current_taken_reverify_approval_and_final() {
        let taken: BTreeSet<(String, String)> = [("connect".to_owned(), "validate".to_owned())]
            .into_iter()
            .collect();
        let svg = render(&workflow(), "validate", &taken);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches(r#"class="state"#).count(), 4);
        assert_eq!(svg.matches("state current").count(), 1);
        assert!(svg.contains("connect → validate (taken)"));
        assert_eq!(svg.matches(r#"class="edge taken""#).count(), 1);
        assert!(svg.contains("↻ reverify") && svg.contains("◆ approval"));
        assert!(svg.contains("state final"));
        assert!(!svg.contains("<script") && !svg.contains("style="));
    }

    #[test]
    fn names_are_escaped() {
        let mut w = workflow();
        w.states[0].name = "<script>x</script>".to_owned();
        w.initial = w.states[0].name.clone();
        let svg = render(&w, "", &BTreeSet::new());
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;"));
    }
}
