//! Routing statistics as data: what a run's router did, token by token, and
//! the aggregates a placement is chosen by (tokens per expert, and how often
//! two experts are picked by the same token).
//!
//! `moec run --stats-out FILE` writes them from a pass; a user can write the
//! same file from their own model's router logs (the book shows the format
//! and a short Python script). `moec simulate --stats FILE` predicts a layer
//! under that traffic instead of uniform routing.
//!
//! The file is JSON, versioned ([`STATS_FORMAT`], [`STATS_VERSION`]); it is
//! checked when read ([`RoutingStatistics::from_json`]): every count, every
//! expert id, and the aggregates against the per-token routing when that is
//! present.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// The `format` field of a statistics file.
pub const STATS_FORMAT: &str = "moec-routing-stats";
/// The version of the format this runtime reads and writes.
pub const STATS_VERSION: u32 = 1;
/// Most experts a statistics file may describe (the co-activation matrix is
/// `experts x experts`).
pub const MAX_STATS_EXPERTS: u64 = 1 << 14;

/// What one rank's router chose in one pass: `[tokens, top_k]` expert ids and
/// weights, and whether capacity dropped each pick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenRouting {
    pub experts: Vec<i32>,
    pub weights: Vec<f32>,
    pub dropped: Vec<bool>,
}

/// The per-token routing of a statistics file: one entry per token, each
/// `top_k` long.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    pub experts: Vec<Vec<u32>>,
    pub weights: Vec<Vec<f32>>,
    /// Picks capacity dropped (`false` everywhere for a dropless layer).
    pub dropped: Vec<Vec<bool>>,
}

/// A statistics file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingStatistics {
    /// Always [`STATS_FORMAT`].
    pub format: String,
    /// Always [`STATS_VERSION`].
    pub version: u32,
    /// The layer's routed experts.
    pub experts: u64,
    /// Picks per token.
    pub top_k: u64,
    /// Tokens the statistics count.
    pub tokens: u64,
    /// Picks of each expert (before capacity drops): sums to `tokens x top_k`.
    pub tokens_per_expert: Vec<u64>,
    /// `coactivation[i][j]`: tokens that picked both `i` and `j` (`i != j`);
    /// symmetric, 0 on the diagonal.
    pub coactivation: Vec<Vec<u64>>,
    /// The per-token routing, when the writer kept it (a placement scores
    /// the distinct ranks and nodes a token reaches with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<Routing>,
}

/// Why a statistics file cannot be used.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsError(pub String);

impl fmt::Display for StatsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "routing statistics: {}", self.0)
    }
}

impl std::error::Error for StatsError {}

fn bad(message: impl Into<String>) -> StatsError {
    StatsError(message.into())
}

impl RoutingStatistics {
    /// The statistics of one pass: every rank's routing, in rank order.
    pub fn from_passes(
        experts: u64,
        top_k: u64,
        ranks: &[TokenRouting],
    ) -> Result<RoutingStatistics, StatsError> {
        let k = usize::try_from(top_k).map_err(|_| bad("top_k does not fit this machine"))?;
        if k == 0 {
            return Err(bad("top_k is 0"));
        }
        let mut routing = Routing::default();
        for r in ranks {
            if r.experts.len() % k != 0
                || r.weights.len() != r.experts.len()
                || r.dropped.len() != r.experts.len()
            {
                return Err(bad(format!(
                    "a rank's routing holds {} ids, {} weights and {} drop flags for top-{k}",
                    r.experts.len(),
                    r.weights.len(),
                    r.dropped.len()
                )));
            }
            for t in 0..r.experts.len() / k {
                let picks = t * k..(t + 1) * k;
                let ids = r.experts[picks.clone()]
                    .iter()
                    .map(|&e| u32::try_from(e).map_err(|_| bad(format!("expert id {e}"))))
                    .collect::<Result<Vec<u32>, _>>()?;
                routing.experts.push(ids);
                routing.weights.push(r.weights[picks.clone()].to_vec());
                routing.dropped.push(r.dropped[picks].to_vec());
            }
        }
        RoutingStatistics::from_routing(experts, top_k, routing)
    }

    /// The aggregates of a per-token routing, kept beside it.
    pub fn from_routing(
        experts: u64,
        top_k: u64,
        routing: Routing,
    ) -> Result<RoutingStatistics, StatsError> {
        if experts == 0 || experts > MAX_STATS_EXPERTS {
            return Err(bad(format!(
                "{experts} experts; expected 1 to {MAX_STATS_EXPERTS}"
            )));
        }
        let (tokens_per_expert, coactivation) = aggregates(experts, top_k, &routing)?;
        Ok(RoutingStatistics {
            format: STATS_FORMAT.into(),
            version: STATS_VERSION,
            experts,
            top_k,
            tokens: routing.experts.len() as u64,
            tokens_per_expert,
            coactivation,
            routing: Some(routing),
        })
    }

    /// Parses and checks a statistics file's text.
    pub fn from_json(text: &str) -> Result<RoutingStatistics, StatsError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let format = value.get("format").and_then(|f| f.as_str());
        if format != Some(STATS_FORMAT) {
            return Err(bad(format!(
                "not a moec statistics file (its `format` is {}, expected \"{STATS_FORMAT}\")",
                format.map_or("missing".to_string(), |f| format!("\"{f}\""))
            )));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(STATS_VERSION)) {
            return Err(bad(format!(
                "format version {}, this moec reads version {STATS_VERSION}",
                version.map_or("missing".to_string(), |v| v.to_string())
            )));
        }
        let stats: RoutingStatistics =
            serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        stats.check()?;
        Ok(stats)
    }

    /// Reads and checks the statistics file at `path`.
    pub fn load(path: &Path) -> Result<RoutingStatistics, StatsError> {
        let text = crate::files::read_to_string(path)
            .map_err(|e| bad(format!("cannot read `{}`: {e}", path.display())))?;
        RoutingStatistics::from_json(&text)
            .map_err(|e| bad(format!("`{}`: {}", path.display(), e.0)))
    }

    /// The file's text (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Every count consistent: the aggregates have the layer's experts, sum
    /// to the picks, and match the per-token routing when it is present.
    pub fn check(&self) -> Result<(), StatsError> {
        if self.experts == 0 || self.experts > MAX_STATS_EXPERTS {
            return Err(bad(format!(
                "{} experts; expected 1 to {MAX_STATS_EXPERTS}",
                self.experts
            )));
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return Err(bad(format!(
                "top_k {} for {} experts",
                self.top_k, self.experts
            )));
        }
        let e = self.experts as usize;
        if self.tokens_per_expert.len() != e {
            return Err(bad(format!(
                "tokens_per_expert has {} entries for {e} experts",
                self.tokens_per_expert.len()
            )));
        }
        let picks = self
            .tokens_per_expert
            .iter()
            .try_fold(0u64, |a, &n| a.checked_add(n))
            .ok_or_else(|| bad("tokens_per_expert overflows"))?;
        if Some(picks) != self.tokens.checked_mul(self.top_k) {
            return Err(bad(format!(
                "tokens_per_expert sums to {picks}, but {} tokens of top-{} make {} picks",
                self.tokens,
                self.top_k,
                self.tokens.saturating_mul(self.top_k)
            )));
        }
        if self.coactivation.len() != e || self.coactivation.iter().any(|row| row.len() != e) {
            return Err(bad(format!("coactivation is not {e} x {e}")));
        }
        for i in 0..e {
            if self.coactivation[i][i] != 0 {
                return Err(bad(format!("coactivation[{i}][{i}] is not 0")));
            }
            if let Some(j) = (0..e).find(|&j| self.coactivation[i][j] != self.coactivation[j][i]) {
                return Err(bad(format!(
                    "coactivation[{i}][{j}] differs from [{j}][{i}]"
                )));
            }
        }
        if let Some(routing) = &self.routing {
            if routing.experts.len() as u64 != self.tokens {
                return Err(bad(format!(
                    "routing has {} tokens, the file counts {}",
                    routing.experts.len(),
                    self.tokens
                )));
            }
            let (per_expert, coactivation) = aggregates(self.experts, self.top_k, routing)?;
            if per_expert != self.tokens_per_expert || coactivation != self.coactivation {
                return Err(bad(
                    "tokens_per_expert or coactivation disagree with the per-token routing",
                ));
            }
        }
        Ok(())
    }

    /// Each expert's share of the picks (sums to 1).
    pub fn load_shares(&self) -> Vec<f64> {
        let total = self.tokens_per_expert.iter().sum::<u64>().max(1) as f64;
        self.tokens_per_expert
            .iter()
            .map(|&n| n as f64 / total)
            .collect()
    }
}

/// Tokens per expert and the co-activation counts of a per-token routing,
/// after checking every entry.
fn aggregates(
    experts: u64,
    top_k: u64,
    routing: &Routing,
) -> Result<(Vec<u64>, Vec<Vec<u64>>), StatsError> {
    let e = experts as usize;
    let k = top_k as usize;
    let n = routing.experts.len();
    if routing.weights.len() != n || routing.dropped.len() != n {
        return Err(bad(format!(
            "routing has {n} tokens of experts, {} of weights and {} of drop flags",
            routing.weights.len(),
            routing.dropped.len()
        )));
    }
    let mut per_expert = vec![0u64; e];
    let mut coactivation = vec![vec![0u64; e]; e];
    for (t, picks) in routing.experts.iter().enumerate() {
        if picks.len() != k || routing.weights[t].len() != k || routing.dropped[t].len() != k {
            return Err(bad(format!(
                "token {t} has not {k} picks, weights and flags"
            )));
        }
        if let Some(w) = routing.weights[t].iter().find(|w| !w.is_finite()) {
            return Err(bad(format!("token {t} has the weight {w}")));
        }
        for (j, &x) in picks.iter().enumerate() {
            let x = x as usize;
            if x >= e {
                return Err(bad(format!("token {t} picks expert {x} of {e}")));
            }
            if picks[..j].iter().any(|&y| y as usize == x) {
                return Err(bad(format!("token {t} picks expert {x} twice")));
            }
            per_expert[x] += 1;
            for &y in &picks[..j] {
                coactivation[x][y as usize] += 1;
                coactivation[y as usize][x] += 1;
            }
        }
    }
    Ok((per_expert, coactivation))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_tokens() -> RoutingStatistics {
        let routing = Routing {
            experts: vec![vec![0, 1], vec![1, 2]],
            weights: vec![vec![0.5, 0.5], vec![0.7, 0.3]],
            dropped: vec![vec![false, false], vec![false, true]],
        };
        RoutingStatistics::from_routing(4, 2, routing).unwrap()
    }

    #[test]
    fn aggregates_count_picks_and_pairs() {
        let s = two_tokens();
        assert_eq!(s.tokens, 2);
        assert_eq!(s.tokens_per_expert, vec![1, 2, 1, 0]);
        assert_eq!(s.coactivation[0][1], 1);
        assert_eq!(s.coactivation[1][2], 1);
        assert_eq!(s.coactivation[2][1], 1);
        assert_eq!(s.coactivation[0][2], 0);
        let back = RoutingStatistics::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_file_that_disagrees_with_itself_is_refused() {
        let mut s = two_tokens();
        s.tokens_per_expert[3] = 1;
        s.tokens_per_expert[0] = 0;
        let e = RoutingStatistics::from_json(&s.to_json()).unwrap_err();
        assert!(e.to_string().contains("disagree"), "{e}");
        let mut s = two_tokens();
        s.coactivation[0][1] = 5;
        let e = RoutingStatistics::from_json(&s.to_json()).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
        let e = RoutingStatistics::from_json("{\"format\": \"x\"}").unwrap_err();
        assert!(e.to_string().contains("not a moec statistics file"), "{e}");
        let text = two_tokens()
            .to_json()
            .replace("\"version\": 1", "\"version\": 9");
        let e = RoutingStatistics::from_json(&text).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        let mut s = two_tokens();
        if let Some(r) = s.routing.as_mut() {
            r.experts[1][1] = 9;
        }
        let e = RoutingStatistics::from_json(&s.to_json()).unwrap_err();
        assert!(e.to_string().contains("expert 9"), "{e}");
    }
}
