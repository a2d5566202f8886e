//! What each rank's collectives really moved: rows and bytes per collective
//! and link class, counted where the bytes are handed to the [`Comm`].
//!
//! The plan's `bytes_sent` is the cost model's expectation under uniform
//! routing; these counts are what one pass with its real routing sent, so the
//! two can be compared (`moec run` prints both, `tests/traffic.rs` checks
//! them). A rank's copy to itself is counted as [`LinkClass::Local`]: it
//! crosses no link, but it makes the conservation laws exact (every kept
//! assignment leaves its source once per leg).
//!
//! [`Comm`]: super::comm::Comm

use std::collections::BTreeMap;
use std::fmt;

/// Which link a message crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinkClass {
    /// To the sending rank itself: no link.
    Local,
    /// To another GPU of the sender's node (NVLink).
    IntraNode,
    /// To a GPU of another node (the network).
    InterNode,
}

impl LinkClass {
    pub const ALL: [LinkClass; 3] = [LinkClass::Local, LinkClass::IntraNode, LinkClass::InterNode];

    /// The class of a message from global rank `from` to global rank `to`
    /// on nodes of `gpus_per_node` ranks.
    pub fn between(from: usize, to: usize, gpus_per_node: usize) -> LinkClass {
        let per_node = gpus_per_node.max(1);
        if from == to {
            LinkClass::Local
        } else if from / per_node == to / per_node {
            LinkClass::IntraNode
        } else {
            LinkClass::InterNode
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LinkClass::Local => "local",
            LinkClass::IntraNode => "intra_node",
            LinkClass::InterNode => "inter_node",
        }
    }
}

impl fmt::Display for LinkClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one rank sent over one link class in one collective (all its chunks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Token rows (0 for metadata: counts, routing).
    pub rows: u64,
    /// Every byte handed to the link, rows and metadata (fp8 rows with their scales).
    pub bytes: u64,
    /// Non-empty messages (one per peer and exchange).
    pub messages: u64,
}

impl Moved {
    pub fn add(&mut self, other: Moved) {
        self.rows += other.rows;
        self.bytes += other.bytes;
        self.messages += other.messages;
    }
}

/// The traffic of one rank in one pass, by collective name (op name, every
/// chunk together) and link class.
pub type RankTraffic = BTreeMap<(String, LinkClass), Moved>;

/// The traffic of every rank summed, by collective and link class.
pub fn total(ranks: &[RankTraffic]) -> RankTraffic {
    let mut sum = RankTraffic::new();
    for rank in ranks {
        for (key, moved) in rank {
            sum.entry(key.clone()).or_default().add(*moved);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_class_follows_the_node_boundary() {
        assert_eq!(LinkClass::between(3, 3, 8), LinkClass::Local);
        assert_eq!(LinkClass::between(0, 7, 8), LinkClass::IntraNode);
        assert_eq!(LinkClass::between(7, 8, 8), LinkClass::InterNode);
        assert_eq!(LinkClass::between(1, 2, 0), LinkClass::InterNode);
    }

    #[test]
    fn totals_add_ranks_up() {
        let mut a = RankTraffic::new();
        let key = ("dispatch".to_string(), LinkClass::IntraNode);
        a.insert(
            key.clone(),
            Moved {
                rows: 2,
                bytes: 20,
                messages: 1,
            },
        );
        let t = total(&[a.clone(), a]);
        assert_eq!(t[&key].rows, 4);
        assert_eq!(t[&key].bytes, 40);
        assert_eq!(t[&key].messages, 2);
    }
}
