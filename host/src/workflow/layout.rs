//! Where each step of a [`Plan`] goes when its DAG is drawn: a layered
//! (Sugiyama) layout by `rust-sugiyama`, top to bottom, one box per step (a
//! `for_each` step is one box whatever its item count).
//!
//! The console draws a run from this. It is done here rather than in the
//! browser because the JavaScript layouts measured on a 2,000-step DAG took
//! 1 to 8 s (dagre overflowed its stack on a chain; elkjs took 1-7 s), where
//! this takes tens of milliseconds; the layout depends only on the workflow's
//! text, so the service keeps it per version.

use rust_sugiyama::configure::{Config, RankingType};
use serde::Serialize;

use super::Plan;

/// A step's box, in pixels.
pub const NODE_WIDTH: f64 = 184.0;
pub const NODE_HEIGHT: f64 = 52.0;
/// Space between boxes of one layer, between layers, and between the
/// disconnected parts of a DAG.
const SPACING: f64 = 28.0;

/// A laid-out DAG: boxes by their top-left corner, the origin at the top
/// left of the drawing.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Layout {
    pub width: f64,
    pub height: f64,
    /// In the plan's step order.
    pub nodes: Vec<LayoutNode>,
    /// From a step to a step that needs it.
    pub edges: Vec<LayoutEdge>,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LayoutNode {
    /// The step's id.
    pub id: String,
    pub x: f64,
    pub y: f64,
    pub width: f64,
    pub height: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LayoutEdge {
    pub from: String,
    pub to: String,
}

impl Layout {
    /// The layout of `plan`'s steps and their `needs`.
    pub fn of(plan: &Plan) -> Layout {
        let ids: Vec<&str> = plan.steps.iter().map(|step| step.id.as_str()).collect();
        let edges: Vec<(u32, u32)> = plan
            .steps
            .iter()
            .enumerate()
            .flat_map(|(to, step)| step.needs.iter().map(move |&from| (from, to)))
            .map(|(from, to)| (index(from), index(to)))
            .collect();
        Layout::place(&ids, &edges)
    }

    /// Nodes named `ids` and `edges` between them, by index.
    fn place(ids: &[&str], edges: &[(u32, u32)]) -> Layout {
        let count = ids.len();
        let vertices: Vec<(u32, (f64, f64))> = (0..count)
            .map(|i| (index(i), (NODE_WIDTH, NODE_HEIGHT)))
            .collect();
        let config = Config {
            // Each step as high as its needs allow: the order it can start
            // in. (The edge-length minimising ranking runs a network simplex
            // that took over a second on 2,000 densely layered steps.)
            ranking_type: RankingType::Up,
            vertex_spacing: SPACING,
            ..Config::default()
        };
        let parts = if count == 0 {
            Vec::new()
        } else {
            rust_sugiyama::from_vertices_and_edges(&vertices, edges, &config)
        };
        let mut nodes: Vec<Option<LayoutNode>> = vec![None; count];
        // Disconnected parts side by side, left to right, tops aligned, in
        // the order of their first step.
        let mut parts: Vec<_> = parts
            .into_iter()
            .map(|(placed, _, _)| placed)
            .filter(|placed| !placed.is_empty())
            .collect();
        parts.sort_by_key(|placed| placed.iter().map(|(i, _)| *i).min());
        let (mut left, mut height) = (0.0_f64, 0.0_f64);
        for placed in parts {
            // rust-sugiyama gives centres; a part's own left and top edge.
            let min_x = placed.iter().map(|(_, (x, _))| *x).fold(f64::MAX, f64::min);
            let min_y = placed.iter().map(|(_, (_, y))| *y).fold(f64::MAX, f64::min);
            let mut right = left;
            for (i, (x, y)) in placed {
                let node = LayoutNode {
                    id: ids[i].to_owned(),
                    x: left + (x - min_x),
                    y: y - min_y,
                    width: NODE_WIDTH,
                    height: NODE_HEIGHT,
                };
                right = right.max(node.x + NODE_WIDTH);
                height = height.max(node.y + NODE_HEIGHT);
                if let Some(slot) = nodes.get_mut(i) {
                    *slot = Some(node);
                }
            }
            left = right + SPACING;
        }
        Layout {
            width: (left - SPACING).max(0.0),
            height,
            // Every vertex is in one part.
            nodes: nodes.into_iter().flatten().collect(),
            edges: edges
                .iter()
                .map(|&(from, to)| LayoutEdge {
                    from: ids[from as usize].to_owned(),
                    to: ids[to as usize].to_owned(),
                })
                .collect(),
        }
    }
}

fn index(i: usize) -> u32 {
    u32::try_from(i).expect("a plan has fewer than 2^32 steps")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("s{i}")).collect()
    }

    fn place(count: usize, edges: &[(u32, u32)]) -> Layout {
        let ids = named(count);
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        Layout::place(&ids, edges)
    }

    fn by_id(layout: &Layout) -> std::collections::HashMap<&str, &LayoutNode> {
        layout.nodes.iter().map(|n| (n.id.as_str(), n)).collect()
    }

    fn overlap(a: &LayoutNode, b: &LayoutNode) -> bool {
        a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height
    }

    #[test]
    fn a_diamond_has_its_layers_top_to_bottom_and_no_box_on_another() {
        let layout = place(4, &[(0, 1), (0, 2), (1, 3), (2, 3)]);
        let nodes: Vec<&LayoutNode> = layout.nodes.iter().collect();
        assert_eq!(nodes.len(), 4);
        let (a, b, c, d) = (nodes[0], nodes[1], nodes[2], nodes[3]);
        assert_eq!(a.y, 0.0);
        assert_eq!(b.y, c.y, "b and c need only a: one layer");
        assert_eq!(b.y, NODE_HEIGHT + SPACING);
        assert_eq!(d.y, 2.0 * (NODE_HEIGHT + SPACING));
        assert_ne!(b.x, c.x);
        for (i, x) in nodes.iter().enumerate() {
            for y in &nodes[i + 1..] {
                assert!(!overlap(x, y), "{x:?} overlaps {y:?}");
            }
            assert!(
                x.x >= 0.0 && x.x + x.width <= layout.width,
                "{x:?} in {}",
                layout.width
            );
            assert!(x.y >= 0.0 && x.y + x.height <= layout.height);
        }
        assert_eq!(layout.height, 3.0 * NODE_HEIGHT + 2.0 * SPACING);
    }

    #[test]
    fn disconnected_steps_stand_side_by_side() {
        let layout = place(3, &[(0, 1)]);
        let nodes = &layout.nodes;
        assert_eq!(nodes.len(), 3);
        assert_eq!((nodes[0].x, nodes[0].y), (0.0, 0.0));
        assert_eq!((nodes[1].x, nodes[1].y), (0.0, NODE_HEIGHT + SPACING));
        assert_eq!((nodes[2].x, nodes[2].y), (NODE_WIDTH + SPACING, 0.0));
        assert_eq!(layout.width, 2.0 * NODE_WIDTH + SPACING);
        assert_eq!(place(0, &[]).nodes, Vec::new());
    }

    #[test]
    fn a_plan_is_laid_out_by_step_id_with_its_needs_as_edges() {
        let plan = crate::workflow::parse_str(
            r#"
            [[step]]
            id = "fetch"
            plugin = "p"
            [[step]]
            id = "shape"
            plugin = "p"
            input = "{{ steps.fetch.output }}"
            [[step]]
            id = "alone"
            plugin = "p"
            "#,
            "g.toml",
            "g",
            &crate::workflow::AnyPlugin,
        )
        .unwrap();
        let layout = Layout::of(&plan);
        let nodes = by_id(&layout);
        assert_eq!(nodes.len(), 3);
        assert!(nodes["shape"].y > nodes["fetch"].y);
        assert_eq!(nodes["alone"].y, 0.0);
        assert_eq!(
            layout.edges,
            vec![LayoutEdge {
                from: "fetch".into(),
                to: "shape".into()
            }]
        );
    }

    #[test]
    fn two_thousand_layered_steps_are_all_placed_apart() {
        let count = 2000;
        let mut edges = Vec::new();
        for i in 20..count {
            edges.push((i - 20, i));
            if i % 3 == 0 {
                edges.push((i - 19, i));
            }
        }
        let layout = place(count as usize, &edges);
        assert_eq!(layout.nodes.len(), count as usize);
        let mut places: Vec<(i64, i64)> = layout
            .nodes
            .iter()
            .map(|n| (n.x as i64, n.y as i64))
            .collect();
        places.sort();
        places.dedup();
        assert_eq!(places.len(), count as usize, "two boxes in one place");
        for &(from, to) in &edges {
            assert!(layout.nodes[to as usize].y > layout.nodes[from as usize].y);
        }
    }
}
