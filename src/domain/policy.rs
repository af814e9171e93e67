//! Configuration the rules consult: the phase dependency graph and the credit policy.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::{Deserialize, Serialize};

use super::batch::BatchContext;
use crate::contracts::PhaseName;

/// Which phase each phase needs to have run first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseGraph {
    prerequisites: BTreeMap<PhaseName, PhaseName>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("phase `{0}` cannot be part of a pipeline")]
    NotAPipelinePhase(PhaseName),
    #[error("the dependency graph has a cycle through `{0}`")]
    Cycle(PhaseName),
}

impl Default for PhaseGraph {
    /// `spellcheck → nlp → ai_feedback`, `spellcheck → cj_assessment`.
    fn default() -> Self {
        Self::new([
            (PhaseName::Nlp, PhaseName::Spellcheck),
            (PhaseName::AiFeedback, PhaseName::Nlp),
            (PhaseName::CjAssessment, PhaseName::Spellcheck),
        ])
        .expect("the default graph is valid")
    }
}

impl PhaseGraph {
    /// Builds a graph from `(phase, prerequisite)` pairs, rejecting cycles and
    /// student matching (which only registration flows dispatch).
    pub fn new(
        edges: impl IntoIterator<Item = (PhaseName, PhaseName)>,
    ) -> Result<Self, GraphError> {
        let graph = Self {
            prerequisites: edges.into_iter().collect(),
        };
        for (&phase, &prerequisite) in &graph.prerequisites {
            for p in [phase, prerequisite] {
                if p == PhaseName::StudentMatching {
                    return Err(GraphError::NotAPipelinePhase(p));
                }
            }
        }
        for &phase in graph.prerequisites.keys() {
            graph.resolve(phase)?;
        }
        Ok(graph)
    }

    /// The ordered phases a request for `target` runs, prerequisites first.
    pub fn resolve(&self, target: PhaseName) -> Result<Vec<PhaseName>, GraphError> {
        if target == PhaseName::StudentMatching {
            return Err(GraphError::NotAPipelinePhase(target));
        }
        let mut chain = vec![target];
        let mut at = target;
        while let Some(&prerequisite) = self.prerequisites.get(&at) {
            if chain.contains(&prerequisite) {
                return Err(GraphError::Cycle(prerequisite));
            }
            chain.push(prerequisite);
            at = prerequisite;
        }
        chain.reverse();
        Ok(chain)
    }

    pub fn edges(&self) -> impl Iterator<Item = (PhaseName, PhaseName)> + '_ {
        self.prerequisites.iter().map(|(&a, &b)| (a, b))
    }
}

/// Credits a run of `phases` over `essays` essays costs, by resource.
pub fn credit_breakdown(phases: &[PhaseName], essays: i64) -> BTreeMap<String, i64> {
    let mut breakdown = BTreeMap::new();
    if phases.contains(&PhaseName::CjAssessment) {
        breakdown.insert("cj_comparison".to_owned(), essays * (essays - 1).max(0) / 2);
    }
    if phases.contains(&PhaseName::AiFeedback) {
        breakdown.insert("ai_feedback_generation".to_owned(), essays);
    }
    breakdown
}

/// What a credit policy answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditVerdict {
    Allowed { available: i64 },
    InsufficientCredits { available: i64 },
    RateLimited { available: i64 },
}

impl CreditVerdict {
    pub fn available(self) -> i64 {
        match self {
            CreditVerdict::Allowed { available }
            | CreditVerdict::InsufficientCredits { available }
            | CreditVerdict::RateLimited { available } => available,
        }
    }
}

/// Decides whether a run may start. Pure: no I/O, same answer for the same input.
pub trait CreditPolicy: Debug + Send + Sync {
    fn check(&self, context: &BatchContext, required: i64) -> CreditVerdict;
}

/// Allows everything (the default); reports the required amount as available.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl CreditPolicy for AllowAll {
    fn check(&self, _context: &BatchContext, required: i64) -> CreditVerdict {
        CreditVerdict::Allowed {
            available: required,
        }
    }
}

/// Every organisation has the same fixed balance; runs costing more are denied.
#[derive(Debug, Clone, Copy)]
pub struct FixedBalance(pub i64);

impl CreditPolicy for FixedBalance {
    fn check(&self, _context: &BatchContext, required: i64) -> CreditVerdict {
        if required <= self.0 {
            CreditVerdict::Allowed { available: self.0 }
        } else {
            CreditVerdict::InsufficientCredits { available: self.0 }
        }
    }
}
