//! What the rules consult besides the batch: the phase graph (from
//! configuration) and the credit check's answers (asked for by the rules,
//! obtained by the caller, passed back in).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::contracts::PhaseName;

/// One phase of the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseNode {
    pub depends_on: Vec<PhaseName>,
    pub requires_prompt: bool,
}

/// The phases a pipeline request can run and what each needs first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseGraph {
    phases: BTreeMap<PhaseName, PhaseNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("phase `{0}` cannot be part of a pipeline (bos dispatches it itself)")]
    NotAPipelinePhase(PhaseName),
    #[error("phase `{phase}` depends on `{dependency}`, which is not a configured phase")]
    UnknownDependency {
        phase: PhaseName,
        dependency: PhaseName,
    },
    #[error("the dependency graph has a cycle: {}", .0.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" → "))]
    Cycle(Vec<PhaseName>),
    #[error("phase `{0}` is not configured")]
    Unknown(PhaseName),
}

impl Default for PhaseGraph {
    /// The platform's definitions: `ai_feedback` needs `spellcheck` and `nlp`,
    /// `nlp` and `cj_assessment` need `spellcheck`; all but spellcheck need a prompt.
    fn default() -> Self {
        use PhaseName::{AiFeedback, CjAssessment, Nlp, Spellcheck};
        Self::new([
            (Spellcheck, vec![], false),
            (Nlp, vec![Spellcheck], true),
            (CjAssessment, vec![Spellcheck], true),
            (AiFeedback, vec![Spellcheck, Nlp], true),
        ])
        .unwrap_or_else(|e| unreachable!("the default graph is valid: {e}"))
    }
}

impl PhaseGraph {
    /// Builds a graph from `(phase, depends_on, requires_prompt)`, rejecting
    /// unknown dependencies, cycles and student matching.
    pub fn new(
        phases: impl IntoIterator<Item = (PhaseName, Vec<PhaseName>, bool)>,
    ) -> Result<Self, GraphError> {
        let graph = Self {
            phases: phases
                .into_iter()
                .map(|(p, depends_on, requires_prompt)| {
                    (
                        p,
                        PhaseNode {
                            depends_on,
                            requires_prompt,
                        },
                    )
                })
                .collect(),
        };
        for (&phase, node) in &graph.phases {
            if phase == PhaseName::StudentMatching {
                return Err(GraphError::NotAPipelinePhase(phase));
            }
            for &dependency in &node.depends_on {
                if dependency == PhaseName::StudentMatching {
                    return Err(GraphError::NotAPipelinePhase(dependency));
                }
                if !graph.phases.contains_key(&dependency) {
                    return Err(GraphError::UnknownDependency { phase, dependency });
                }
            }
        }
        for &phase in graph.phases.keys() {
            graph.resolve(phase)?;
        }
        Ok(graph)
    }

    pub fn contains(&self, phase: PhaseName) -> bool {
        self.phases.contains_key(&phase)
    }

    pub fn node(&self, phase: PhaseName) -> Option<&PhaseNode> {
        self.phases.get(&phase)
    }

    pub fn requires_prompt(&self, phase: PhaseName) -> bool {
        self.phases.get(&phase).is_some_and(|n| n.requires_prompt)
    }

    /// The phases a request for `target` runs: its transitive dependencies in a
    /// dependency order (depth first, in `depends_on` order), the target last.
    pub fn resolve(&self, target: PhaseName) -> Result<Vec<PhaseName>, GraphError> {
        if target == PhaseName::StudentMatching {
            return Err(GraphError::NotAPipelinePhase(target));
        }
        if !self.phases.contains_key(&target) {
            return Err(GraphError::Unknown(target));
        }
        let mut order = Vec::new();
        let mut path = Vec::new();
        self.visit(target, &mut path, &mut order)?;
        Ok(order)
    }

    fn visit(
        &self,
        phase: PhaseName,
        path: &mut Vec<PhaseName>,
        order: &mut Vec<PhaseName>,
    ) -> Result<(), GraphError> {
        if order.contains(&phase) {
            return Ok(());
        }
        if let Some(at) = path.iter().position(|&p| p == phase) {
            let mut cycle = path[at..].to_vec();
            cycle.push(phase);
            return Err(GraphError::Cycle(cycle));
        }
        path.push(phase);
        if let Some(node) = self.phases.get(&phase) {
            for &dependency in &node.depends_on {
                self.visit(dependency, path, order)?;
            }
        }
        path.pop();
        order.push(phase);
        Ok(())
    }

    /// Every phase `phase` needs, directly or not.
    pub fn ancestors(&self, phase: PhaseName) -> BTreeSet<PhaseName> {
        let mut out = BTreeSet::new();
        let mut stack = vec![phase];
        while let Some(p) = stack.pop() {
            if let Some(node) = self.phases.get(&p) {
                for &d in &node.depends_on {
                    if out.insert(d) {
                        stack.push(d);
                    }
                }
            }
        }
        out
    }

    pub fn phases(&self) -> impl Iterator<Item = (PhaseName, &PhaseNode)> + '_ {
        self.phases.iter().map(|(&p, n)| (p, n))
    }
}

/// The billable resources of a run, always with both keys (zero when unused).
pub fn credit_breakdown(phases: &[PhaseName], essays: i64) -> BTreeMap<String, i64> {
    let cj = if phases.contains(&PhaseName::CjAssessment) {
        essays * (essays - 1).max(0) / 2
    } else {
        0
    };
    let ai = if phases.contains(&PhaseName::AiFeedback) {
        essays
    } else {
        0
    };
    BTreeMap::from([
        (CJ_COMPARISON.to_owned(), cj),
        (AI_FEEDBACK_GENERATION.to_owned(), ai),
    ])
}

pub const CJ_COMPARISON: &str = "cj_comparison";
pub const AI_FEEDBACK_GENERATION: &str = "ai_feedback_generation";

/// What the rules ask the credit policy before a run starts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CreditQuery {
    pub user_id: String,
    pub org_id: Option<String>,
    /// Resource → quantity; only quantities above zero.
    pub requirements: BTreeMap<String, i64>,
}

impl CreditQuery {
    pub fn required(&self) -> i64 {
        self.requirements.values().sum()
    }
}

/// What a credit policy answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreditVerdict {
    Allowed { available: i64 },
    Denied { reason: String, available: i64 },
}

impl CreditVerdict {
    pub fn available(&self) -> i64 {
        match self {
            CreditVerdict::Allowed { available } | CreditVerdict::Denied { available, .. } => {
                *available
            }
        }
    }
}

/// Answers obtained so far for one decision (or one poll).
pub type CreditAnswers = BTreeMap<CreditQuery, CreditVerdict>;
