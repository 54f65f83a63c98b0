//! A flow's steps drawn as an SVG graph: one column per depth (the longest path from a
//! step without dependencies), edges from `after`, choices and catches, and each step
//! coloured by its status when a run is drawn.

use std::collections::HashMap;

use maud::{html, Markup};

use flowgrid_engine::StepStatus;
use flowgrid_model::{FlowDefinition, Step};

const NODE_WIDTH: i64 = 168;
const NODE_HEIGHT: i64 = 46;
const COLUMN_GAP: i64 = 80;
const ROW_GAP: i64 = 22;
const MARGIN: i64 = 12;
/// Waypoints of long edges a drawing routes at most; past it they go straight.
const WAYPOINTS_MAX: usize = 5_000;

/// One step placed in the drawing.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub kind: &'static str,
    pub column: usize,
    pub row: usize,
}

/// An edge between two placed steps, with what activates it when that is not plain success.
#[derive(Debug, PartialEq, Eq)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub label: Option<String>,
    /// Where it passes the columns between its ends: (column, row).
    pub via: Vec<(usize, usize)>,
}

/// The placed steps (in definition order) and the edges between them.
#[derive(Debug, PartialEq, Eq)]
pub struct Layout {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

impl Layout {
    /// Places the steps of a valid definition (acyclic, every name resolves; anything
    /// else is left out of the drawing rather than failing it).
    pub fn of(definition: &FlowDefinition) -> Layout {
        let index: HashMap<&str, usize> =
            definition.steps.iter().enumerate().map(|(position, step)| (step.id(), position)).collect();
        let mut links: Vec<(usize, usize, Option<String>)> = Vec::new();
        for (to, step) in definition.steps.iter().enumerate() {
            for after in step.after() {
                if let Some(&from) = index.get(after.as_str()) {
                    links.push((from, to, None));
                }
            }
        }
        for (from, step) in definition.steps.iter().enumerate() {
            for (target, label) in branch_targets(step) {
                if let Some(&to) = index.get(target) {
                    links.push((from, to, Some(label)));
                }
            }
        }
        // Longest path from a root; a definition with a cycle stops after one pass per step.
        let mut column = vec![0usize; definition.steps.len()];
        for _ in 0..definition.steps.len() {
            let mut changed = false;
            for &(from, to, _) in &links {
                if column[to] < column[from] + 1 {
                    column[to] = column[from] + 1;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Vertices: the steps, then a waypoint in every column an edge passes through, so
        // that a long edge gets a row of its own there instead of crossing a step. Past
        // [`WAYPOINTS_MAX`] (many long edges: a drawing of megabytes), long edges go straight.
        let waypoints: usize = links.iter().map(|&(from, to, _)| column[to].saturating_sub(column[from] + 1)).sum();
        let routed = waypoints <= WAYPOINTS_MAX;
        let mut vertex_column = column.clone();
        let mut chains: Vec<Vec<usize>> = Vec::with_capacity(links.len());
        for &(from, to, _) in &links {
            let mut chain = vec![from];
            if routed {
                for passed in column[from] + 1..column[to] {
                    vertex_column.push(passed);
                    chain.push(vertex_column.len() - 1);
                }
            }
            chain.push(to);
            chains.push(chain);
        }
        let mut before: Vec<Vec<usize>> = vec![Vec::new(); vertex_column.len()];
        for chain in &chains {
            for pair in chain.windows(2) {
                before[pair[1]].push(pair[0]);
            }
        }
        // Rows: column by column, each vertex near the mean row of those it follows (fewer
        // crossings); steps in definition order, then waypoints, on ties.
        let mut row = vec![0usize; vertex_column.len()];
        let columns = column.iter().max().map_or(0, |last| last + 1);
        let mut in_column: Vec<Vec<usize>> = vec![Vec::new(); columns];
        for (vertex, &at) in vertex_column.iter().enumerate() {
            in_column[at].push(vertex);
        }
        for members in in_column {
            let mut members: Vec<(f64, usize)> = members
                .into_iter()
                .map(|vertex| {
                    let rows: Vec<usize> = before[vertex].iter().map(|&earlier| row[earlier]).collect();
                    let mean =
                        if rows.is_empty() { f64::MAX } else { rows.iter().sum::<usize>() as f64 / rows.len() as f64 };
                    (mean, vertex)
                })
                .collect();
            members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for (position, (_, vertex)) in members.into_iter().enumerate() {
                row[vertex] = position;
            }
        }
        let nodes = definition
            .steps
            .iter()
            .enumerate()
            .map(|(step, definition_step)| Node {
                id: definition_step.id().to_owned(),
                kind: match definition_step {
                    Step::Subflow(subflow) if subflow.repeat.is_some() => "subflow loop",
                    _ => definition_step.kind_name(),
                },
                column: column[step],
                row: row[step],
            })
            .collect();
        let edges = links
            .into_iter()
            .zip(chains)
            .map(|((from, to, label), chain)| Edge {
                from,
                to,
                label,
                via: chain[1..chain.len() - 1]
                    .iter()
                    .map(|&waypoint| (vertex_column[waypoint], row[waypoint]))
                    .collect(),
            })
            .collect();
        Layout { nodes, edges }
    }

    fn width(&self) -> i64 {
        let columns = self.nodes.iter().map(|node| node.column + 1).max().unwrap_or(1) as i64;
        2 * MARGIN + columns * NODE_WIDTH + (columns - 1) * COLUMN_GAP
    }

    fn height(&self) -> i64 {
        let step_rows = self.nodes.iter().map(|node| node.row + 1);
        let waypoint_rows = self.edges.iter().flat_map(|edge| edge.via.iter().map(|(_, row)| row + 1));
        let rows = step_rows.chain(waypoint_rows).max().unwrap_or(1) as i64;
        2 * MARGIN + rows * NODE_HEIGHT + (rows - 1) * ROW_GAP
    }

    /// The drawing; `statuses` colours each step by its status in a run.
    pub fn svg(&self, statuses: &HashMap<&str, StepStatus>) -> Markup {
        let (width, height) = (self.width(), self.height());
        html! {
            svg class="dag" xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
                viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="the flow's steps and edges" {
                defs {
                    marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7"
                        orient="auto-start-reverse" {
                        path d="M 0 0 L 10 5 L 0 10 z" fill="#667" {}
                    }
                }
                @for edge in &self.edges {
                    @let (path, (label_x, label_y)) = edge_path(&self.nodes[edge.from], &self.nodes[edge.to], &edge.via);
                    path class=(if edge.label.is_some() { "edge branch" } else { "edge" }) d=(path) marker-end="url(#arrow)" {}
                    @if let Some(label) = &edge.label {
                        text class="edge-label" x=(label_x) y=(label_y) text-anchor="middle" { (label) }
                    }
                }
                @for node in &self.nodes {
                    @let status = statuses.get(node.id.as_str()).copied();
                    g class=(format!("node {}", status.map_or("none", StepStatus::as_str))) {
                        title { (node.id) " (" (node.kind) ")" @if let Some(status) = status { ": " (status.as_str()) } }
                        rect x=(x_of(node)) y=(y_of(node)) width=(NODE_WIDTH) height=(NODE_HEIGHT) rx="6" {}
                        text class="step-id" x=(x_of(node) + NODE_WIDTH / 2) y=(y_of(node) + 20) text-anchor="middle" {
                            (shorten(&node.id))
                        }
                        text class="step-kind" x=(x_of(node) + NODE_WIDTH / 2) y=(y_of(node) + 36) text-anchor="middle" {
                            (node.kind) @if let Some(status) = status { " · " (status.as_str()) }
                        }
                    }
                }
            }
        }
    }
}

/// The steps a choice or a catch leads to, with what takes each edge.
fn branch_targets(step: &Step) -> Vec<(&str, String)> {
    let catch = match step {
        Step::Task(task) => task.catch.as_slice(),
        Step::Map(map) => map.catch.as_slice(),
        Step::Signal(signal) => signal.catch.as_slice(),
        Step::Subflow(subflow) => subflow.catch.as_slice(),
        Step::Choice(choice) => {
            let mut targets: Vec<(&str, String)> = choice
                .choices
                .iter()
                .enumerate()
                .map(|(rule, choice_rule)| (choice_rule.next.as_str(), format!("rule {}", rule + 1)))
                .collect();
            targets.extend(choice.default.as_deref().map(|default| (default, "default".to_owned())));
            return targets;
        }
        _ => &[],
    };
    catch.iter().map(|rule| (rule.next.as_str(), "catch".to_owned())).collect()
}

fn x_of(node: &Node) -> i64 {
    x_of_column(node.column)
}

fn y_of(node: &Node) -> i64 {
    y_of_row(node.row)
}

fn x_of_column(column: usize) -> i64 {
    MARGIN + column as i64 * (NODE_WIDTH + COLUMN_GAP)
}

fn y_of_row(row: usize) -> i64 {
    MARGIN + row as i64 * (NODE_HEIGHT + ROW_GAP)
}

/// An edge's path: curves between columns, straight through the waypoints it passes.
/// Returns the path and where its label goes (near its start).
fn edge_path(from: &Node, to: &Node, via: &[(usize, usize)]) -> (String, (i64, i64)) {
    let curve = |path: &mut String, (x1, y1): (i64, i64), (x2, y2): (i64, i64)| {
        let bend = (x2 - x1).abs() / 2 + 10;
        path.push_str(&format!(" C {} {y1}, {} {y2}, {x2} {y2}", x1 + bend, x2 - bend));
    };
    let start = (x_of(from) + NODE_WIDTH, y_of(from) + NODE_HEIGHT / 2);
    let mut path = format!("M {} {}", start.0, start.1);
    let mut at = start;
    for &(column, row) in via {
        let entry = (x_of_column(column), y_of_row(row) + NODE_HEIGHT / 2);
        curve(&mut path, at, entry);
        at = (entry.0 + NODE_WIDTH, entry.1);
        path.push_str(&format!(" L {} {}", at.0, at.1));
    }
    let end = (x_of(to), y_of(to) + NODE_HEIGHT / 2);
    curve(&mut path, at, end);
    let first_stop = via.first().map_or(end, |&(column, row)| (x_of_column(column), y_of_row(row) + NODE_HEIGHT / 2));
    let label = (start.0 + (first_stop.0 - start.0) / 3, start.1 + (first_stop.1 - start.1) / 3 - 5);
    (path, label)
}

/// A step id that fits its box; the full id is in the box's tooltip.
fn shorten(id: &str) -> String {
    const SHOWN_MAX: usize = 20;
    if id.chars().count() <= SHOWN_MAX {
        id.to_owned()
    } else {
        let head: String = id.chars().take(SHOWN_MAX - 1).collect();
        format!("{head}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(yaml: &str) -> FlowDefinition {
        flowgrid_model::parse_definition(yaml, &flowgrid_model::Limits::default()).unwrap()
    }

    #[test]
    fn steps_sit_one_column_after_their_deepest_dependency() {
        let layout = Layout::of(&definition(
            r#"
name: f
steps:
  - { kind: task, id: a, pool: p, task: t, catch: [{ errors: [x], next: fix }] }
  - { kind: choice, id: route, after: [a], choices: [{ when: "true", next: b }], default: c }
  - { kind: task, id: b, pool: p, task: t }
  - { kind: wait, id: c, duration_ms: 5 }
  - { kind: transform, id: fix, output: "1" }
  - { kind: succeed, id: done, after: [b, c] }
"#,
        ));
        let placed: Vec<(&str, usize, usize)> =
            layout.nodes.iter().map(|node| (node.id.as_str(), node.column, node.row)).collect();
        assert_eq!(placed, [("a", 0, 0), ("route", 1, 0), ("b", 2, 0), ("c", 2, 1), ("fix", 1, 1), ("done", 3, 0)]);
        let labels: Vec<(usize, usize, Option<&str>)> =
            layout.edges.iter().map(|edge| (edge.from, edge.to, edge.label.as_deref())).collect();
        assert_eq!(
            labels,
            [
                (0, 1, None),
                (2, 5, None),
                (3, 5, None),
                (0, 4, Some("catch")),
                (1, 2, Some("rule 1")),
                (1, 3, Some("default"))
            ]
        );
    }

    #[test]
    fn a_thousand_steps_each_after_the_first_and_the_previous_draw_in_bounded_size() {
        let mut yaml = String::from("name: wide\nsteps:\n  - { kind: wait, id: s0, duration_ms: 1 }\n  - { kind: wait, id: s1, duration_ms: 1, after: [s0] }\n");
        for step in 2..1_000 {
            yaml.push_str(&format!("  - {{ kind: wait, id: s{step}, duration_ms: 1, after: [s0, s{}] }}\n", step - 1));
        }
        let layout = Layout::of(&definition(&yaml));
        assert_eq!(layout.nodes.last().map(|node| node.column), Some(999));
        assert!(layout.edges.iter().all(|edge| edge.via.is_empty()), "half a million waypoints were routed");
        let drawn = layout.svg(&HashMap::new()).into_string();
        assert!(drawn.len() < 2 << 20, "{} bytes", drawn.len());
    }

    #[test]
    fn the_drawing_shortens_long_ids_and_colours_steps_by_status() {
        let layout = Layout::of(&definition(
            "name: f\nsteps:\n  - { kind: task, id: a_very_long_step_identifier, pool: p, task: t }\n",
        ));
        let statuses = HashMap::from([("a_very_long_step_identifier", StepStatus::Running)]);
        let svg = layout.svg(&statuses).into_string();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains(r#"class="node running""#), "{svg}");
        assert!(svg.contains("a_very_long_step_id…"), "{svg}");
        assert!(svg.contains("<title>a_very_long_step_identifier (task): running</title>"), "{svg}");
        let looped =
            "name: f\nsteps:\n  - { kind: subflow, id: agent, flow: turn, repeat: { until: 'result.done' } }\n";
        let svg = Layout::of(&definition(looped)).svg(&HashMap::new()).into_string();
        assert!(svg.contains("<title>agent (subflow loop)</title>"), "{svg}");
    }
}
