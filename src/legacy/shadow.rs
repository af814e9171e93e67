//! `bos shadow-report`: the commands a shadow run (`bos run --shadow`)
//! published, compared per batch with those the live service published —
//! the same phases in the same order, each with the same essays, the same
//! denials and the same completions. Every difference is listed.

use std::collections::{BTreeMap, BTreeSet};

use rdkafka::Message;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::KafkaSettings;
use crate::contracts::topics;

/// The topics compared: every phase command, denials and completions.
pub const COMPARED: [&str; 7] = [
    topics::SPELLCHECK_COMMAND,
    topics::NLP_COMMAND,
    topics::CJ_ASSESSMENT_COMMAND,
    topics::AI_FEEDBACK_COMMAND,
    topics::STUDENT_MATCHING_COMMAND,
    topics::PIPELINE_DENIED,
    topics::PIPELINE_COMPLETED,
];

/// One published decision about a batch, reduced to what must agree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    Command {
        phase: String,
        essays: Vec<(String, String)>,
    },
    Denied {
        pipeline: String,
        reason: String,
    },
    Completed {
        final_status: String,
        phases: Vec<String>,
    },
}

impl Step {
    /// `envelope` published on `topic` (unprefixed): the batch and the step.
    pub fn of(topic: &str, envelope: &Value) -> Option<(String, Step)> {
        let data = &envelope["data"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        if let Some(phase) = topics::phase_of_command(topic) {
            let mut essays: Vec<(String, String)> = data["essays_to_process"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| (text(&e["essay_id"]), text(&e["text_storage_id"])))
                .collect();
            essays.sort();
            return Some((
                text(&data["entity_id"]),
                Step::Command {
                    phase: phase.as_str().to_owned(),
                    essays,
                },
            ));
        }
        match topic {
            topics::PIPELINE_DENIED => Some((
                text(&data["batch_id"]),
                Step::Denied {
                    pipeline: text(&data["requested_pipeline"]),
                    reason: text(&data["denial_reason"]),
                },
            )),
            topics::PIPELINE_COMPLETED => Some((
                text(&data["batch_id"]),
                Step::Completed {
                    final_status: text(&data["final_status"]),
                    phases: data["completed_phases"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(text)
                        .collect(),
                },
            )),
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Step::Command { .. } => "commands",
            Step::Denied { .. } => "denials",
            Step::Completed { .. } => "completions",
        }
    }
}

/// One difference between the live service and the shadow run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub batch_id: String,
    pub what: String,
    pub live: Value,
    pub shadow: Value,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowReport {
    pub live_messages: usize,
    pub shadow_messages: usize,
    /// Batches with published decisions on both sides.
    pub batches_compared: usize,
    pub differences: Vec<Difference>,
}

impl ShadowReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} live and {} shadow message(s); {} batch(es) on both sides; {} difference(s)\n",
            self.live_messages,
            self.shadow_messages,
            self.batches_compared,
            self.differences.len()
        );
        for d in &self.differences {
            out += &format!(
                "  {}: {}\n      live:   {}\n      shadow: {}\n",
                d.batch_id, d.what, d.live, d.shadow
            );
        }
        out
    }
}

/// Per batch, its steps in the order they were published.
pub type Steps = BTreeMap<String, Vec<Step>>;

/// Every difference between `live` and `shadow`, batch by batch.
pub fn compare(live: &Steps, shadow: &Steps) -> Vec<Difference> {
    let mut differences = Vec::new();
    let batches: BTreeSet<&String> = live.keys().chain(shadow.keys()).collect();
    for batch in batches {
        let (l, s) = (live.get(batch), shadow.get(batch));
        let (l, s) = match (l, s) {
            (Some(l), Some(s)) => (l, s),
            (l, s) => {
                differences.push(Difference {
                    batch_id: batch.clone(),
                    what: format!(
                        "published only by the {}",
                        if l.is_some() {
                            "live service"
                        } else {
                            "shadow run"
                        }
                    ),
                    live: json!(l),
                    shadow: json!(s),
                });
                continue;
            }
        };
        // The order of phases commanded.
        let phases = |steps: &[Step]| -> Vec<String> {
            steps
                .iter()
                .filter_map(|s| match s {
                    Step::Command { phase, .. } => Some(phase.clone()),
                    _ => None,
                })
                .collect()
        };
        let (lp, sp) = (phases(l), phases(s));
        if lp != sp {
            differences.push(Difference {
                batch_id: batch.clone(),
                what: "phases commanded (in order)".to_owned(),
                live: json!(lp),
                shadow: json!(sp),
            });
        }
        // Each phase's essays, where both commanded it.
        let essays = |steps: &[Step]| -> BTreeMap<String, Vec<Vec<(String, String)>>> {
            let mut by_phase: BTreeMap<String, Vec<Vec<(String, String)>>> = BTreeMap::new();
            for s in steps {
                if let Step::Command { phase, essays } = s {
                    by_phase
                        .entry(phase.clone())
                        .or_default()
                        .push(essays.clone());
                }
            }
            by_phase
        };
        let (le, se) = (essays(l), essays(s));
        for (phase, lists) in &le {
            if let Some(other) = se.get(phase) {
                if lists != other {
                    differences.push(Difference {
                        batch_id: batch.clone(),
                        what: format!("essays of {phase}"),
                        live: json!(lists),
                        shadow: json!(other),
                    });
                }
            }
        }
        // Denials and completions, in order.
        for kind in ["denials", "completions"] {
            let of_kind = |steps: &[Step]| -> Vec<Step> {
                steps.iter().filter(|s| s.kind() == kind).cloned().collect()
            };
            let (lk, sk) = (of_kind(l), of_kind(s));
            if lk != sk {
                differences.push(Difference {
                    batch_id: batch.clone(),
                    what: kind.to_owned(),
                    live: json!(lk),
                    shadow: json!(sk),
                });
            }
        }
    }
    differences
}

/// Reads the live and the shadow topics as they are now and compares them.
pub async fn report(
    kafka: &KafkaSettings,
    shadow_prefix: &str,
    limit: usize,
) -> anyhow::Result<ShadowReport> {
    let shadow = kafka.shadow(shadow_prefix);
    let read = |settings: &KafkaSettings| {
        let names: Vec<String> = COMPARED.iter().map(|t| settings.published(t)).collect();
        let settings = settings.clone();
        async move {
            let messages = crate::ops::dlq::snapshot(&settings, &names, limit).await?;
            let mut timed: Vec<(i64, String, Step)> = messages
                .iter()
                .filter_map(|m| {
                    let prefix = settings
                        .publish_prefix
                        .as_deref()
                        .unwrap_or(&settings.topic_prefix);
                    let topic = m.topic().strip_prefix(prefix).unwrap_or(m.topic());
                    let envelope: Value = serde_json::from_slice(m.payload()?).ok()?;
                    let (batch, step) = Step::of(topic, &envelope)?;
                    Some((m.timestamp().to_millis().unwrap_or(0), batch, step))
                })
                .collect();
            timed.sort_by_key(|(ms, _, _)| *ms);
            let count = messages.len();
            let mut steps = Steps::new();
            for (_, batch, step) in timed {
                steps.entry(batch).or_default().push(step);
            }
            anyhow::Ok((count, steps))
        }
    };
    let (live_messages, live) = read(kafka).await?;
    let (shadow_messages, shadowed) = read(&shadow).await?;
    let differences = compare(&live, &shadowed);
    Ok(ShadowReport {
        live_messages,
        shadow_messages,
        batches_compared: live.keys().filter(|b| shadowed.contains_key(*b)).count(),
        differences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(phase: &str, essays: &[&str]) -> Step {
        Step::Command {
            phase: phase.into(),
            essays: essays
                .iter()
                .map(|e| ((*e).into(), format!("s-{e}")))
                .collect(),
        }
    }

    #[test]
    fn equal_histories_have_no_difference_and_each_kind_is_named() {
        let steps: Steps = [(
            "b".to_owned(),
            vec![command("spellcheck", &["1", "2"]), command("nlp", &["1"])],
        )]
        .into();
        assert!(compare(&steps, &steps).is_empty());
        let mut other = steps.clone();
        other.get_mut("b").unwrap()[1] = command("nlp", &["2"]);
        other.get_mut("b").unwrap().push(Step::Denied {
            pipeline: "cj_assessment".into(),
            reason: "insufficient_credits".into(),
        });
        let whats: Vec<String> = compare(&steps, &other)
            .into_iter()
            .map(|d| d.what)
            .collect();
        assert_eq!(whats, ["essays of nlp", "denials"]);
        let mut reordered = steps.clone();
        reordered.get_mut("b").unwrap().reverse();
        assert_eq!(
            compare(&steps, &reordered)[0].what,
            "phases commanded (in order)"
        );
        let only: Steps = [("c".to_owned(), vec![command("spellcheck", &["1"])])].into();
        assert_eq!(
            compare(&steps, &only).len(),
            2,
            "b only live, c only shadow"
        );
    }
}
