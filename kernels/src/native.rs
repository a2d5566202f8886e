//! Hand-written CUDA kernels: the assignment kernels that count, exchange
//! and place routed rows across tokens (the CPU backend runs the same
//! contract natively in `moec_runtime::cpu::layout`), and the routing's
//! offsets and the all-to-all copy between virtual ranks, which read the
//! routing table on the device.
//!
//! [`SOURCE`] is one translation unit (`cuda_templates/assign.cu`, no header
//! included) that NVRTC compiles with [`crate::cuda::NVRTC_OPTIONS`]. Its
//! kernels follow the generated kernels' launch contract: the parameters of
//! [`NativeKernel::params`] in order (a buffer is a pointer and its length in
//! elements, a scalar a `long long`), then `long long rows` and a four-word
//! `long long* status`; one row per thread over a grid-stride loop; every
//! buffer access checked. The status codes are those of
//! [`crate::cuda`] plus the ones [`NativeKernel`] documents.

use crate::ir::{Access, Elem, Param, ParamKind, Ty};

/// The CUDA C of the native kernels.
pub const SOURCE: &str = include_str!("cuda_templates/assign.cu");

/// `status[0]` when an expert id lies outside `0..E` (`status[1]` the id,
/// `status[2]` its index in the routing).
pub const STATUS_BAD_EXPERT: i64 = 4;
/// `status[0]` when a routing weight is not finite (`status[2]` its index).
pub const STATUS_BAD_WEIGHT: i64 = 5;
/// `status[0]` when a peer's metadata is corrupt (`status[1]` the peer).
pub const STATUS_BAD_METADATA: i64 = 6;
/// `status[0]` when the exchanged counts disagree with this rank's own
/// routing (`status[1]` the chunk, `[2]` the destination rank, `[3]` the
/// local expert).
pub const STATUS_COUNTS_DISAGREE: i64 = 7;

/// A native kernel of [`SOURCE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NativeKernel {
    /// One row per token: this rank's metadata (per-chunk, per-expert counts
    /// added into a zeroed `meta`; or, for `drop = probs`, every
    /// assignment's expert and weight bits).
    AssignCount,
    /// Dispatch by rank (counts), one row per token: the by-rank row counts
    /// (one per distinct destination rank of the token's picks) added into
    /// `meta` after each chunk's expert counts.
    AssignRankCount,
    /// One row per expert: the kept rows of the group into the zeroed routing
    /// table, this rank's kept counts per chunk (dropless, `drop = position`).
    AssignKeepCounts,
    /// `drop = probs`, one row per assignment of the group: how many
    /// assignments each expert has, added into a zeroed `cursor`.
    ProbsCount,
    /// `drop = probs`, one row: where each expert's bucket starts (`starts`,
    /// one more than experts), and `cursor` reset to those starts.
    ProbsStarts,
    /// `drop = probs`, one row per assignment: its sort key and row into its
    /// expert's bucket.
    ProbsFill,
    /// `drop = probs`, one row per position: sorted runs of width
    /// `2^shift` inside each bucket merged pairwise into the other buffers
    /// (one launch per width, [`probs_merge_shifts`]).
    ProbsMerge,
    /// `drop = probs`, one row per sorted position: whether it is kept,
    /// counted into the zeroed table.
    AssignKeepProbs,
    /// One row per (chunk, destination, local expert): this rank's send rows
    /// into `slots` (all `-1` before), its routed and dropped counts.
    AssignSlots,
    /// One row: the dropless overflow flag.
    AssignOverflow,
    /// One row per (chunk, source, EP rank): where each table cell's rows
    /// start in the source's send buffer and in the rank's expert buffer
    /// (packed, or `padded` rows per local expert in capacity plans).
    RouteOffsets,
    /// Dispatch by rank, pass 3, one row per (source, local expert): the
    /// expert-side row and weight of every pick of the by-rank rows one
    /// chunk received, from the received pick rows and the chunk's table
    /// (`cpu::layout::expand_index` on the device).
    AssignExpand,
    /// An all-to-all's rows from one peer, pulled by the receiving rank
    /// (virtual ranks of one GPU): one block per (local expert, row) unit.
    RouteCopy,
    /// One row per byte run (source offset, destination offset, bytes):
    /// the hierarchical legs over NCCL pack each peer's rows into one
    /// message and unpack what arrives.
    CopyRuns,
}

fn buf(name: &str, elem: Elem, access: Access) -> Param {
    Param {
        name: name.to_string(),
        kind: ParamKind::Buffer { elem, access },
    }
}

fn int(name: &str) -> Param {
    Param {
        name: name.to_string(),
        kind: ParamKind::Scalar(Ty::I64),
    }
}

impl NativeKernel {
    pub const ALL: [NativeKernel; 14] = [
        NativeKernel::AssignCount,
        NativeKernel::AssignRankCount,
        NativeKernel::AssignKeepCounts,
        NativeKernel::ProbsCount,
        NativeKernel::ProbsStarts,
        NativeKernel::ProbsFill,
        NativeKernel::ProbsMerge,
        NativeKernel::AssignKeepProbs,
        NativeKernel::AssignSlots,
        NativeKernel::AssignOverflow,
        NativeKernel::RouteOffsets,
        NativeKernel::AssignExpand,
        NativeKernel::RouteCopy,
        NativeKernel::CopyRuns,
    ];

    /// The `extern "C"` symbol in [`SOURCE`].
    pub fn symbol(self) -> &'static str {
        match self {
            NativeKernel::AssignCount => "moec_assign_count",
            NativeKernel::AssignRankCount => "moec_assign_rank_count",
            NativeKernel::AssignKeepCounts => "moec_assign_keep_counts",
            NativeKernel::ProbsCount => "moec_probs_count",
            NativeKernel::ProbsStarts => "moec_probs_starts",
            NativeKernel::ProbsFill => "moec_probs_fill",
            NativeKernel::ProbsMerge => "moec_probs_merge",
            NativeKernel::AssignKeepProbs => "moec_assign_keep_probs",
            NativeKernel::AssignSlots => "moec_assign_slots",
            NativeKernel::AssignOverflow => "moec_assign_overflow",
            NativeKernel::RouteOffsets => "moec_route_offsets",
            NativeKernel::AssignExpand => "moec_assign_expand",
            NativeKernel::RouteCopy => "moec_route_copy",
            NativeKernel::CopyRuns => "moec_copy_runs",
        }
    }

    /// The parameters before `rows` and `status`, in launch order.
    pub fn params(self) -> Vec<Param> {
        use Access::{Read, ReadWrite, Write};
        match self {
            NativeKernel::AssignCount => vec![
                buf("ids", Elem::I32, Read),
                buf("weights", Elem::F32, Read),
                buf("meta", Elem::I32, ReadWrite),
                int("tokens"),
                int("top_k"),
                int("experts"),
                int("chunk_tokens"),
                int("probs"),
                int("chunk_stride"),
            ],
            NativeKernel::AssignRankCount => vec![
                buf("ids", Elem::I32, Read),
                buf("dest_rank", Elem::I32, Read),
                buf("meta", Elem::I32, ReadWrite),
                int("me"),
                int("top_k"),
                int("experts"),
                int("chunk_tokens"),
                int("chunk_stride"),
            ],
            NativeKernel::AssignKeepCounts => vec![
                buf("meta_all", Elem::I32, Read),
                buf("dest_rank", Elem::I32, Read),
                buf("dest_local", Elem::I32, Read),
                buf("table", Elem::I32, ReadWrite),
                buf("keep_own", Elem::I32, Write),
                int("group"),
                int("me"),
                int("experts"),
                int("chunks"),
                int("max_local"),
                int("capacity"),
                int("chunk_stride"),
            ],
            NativeKernel::ProbsCount => vec![
                buf("meta_all", Elem::I32, Read),
                buf("cursor", Elem::I32, ReadWrite),
                int("tokens"),
                int("top_k"),
                int("experts"),
            ],
            NativeKernel::ProbsStarts => vec![
                buf("cursor", Elem::I32, ReadWrite),
                buf("starts", Elem::I32, Write),
                int("experts"),
            ],
            NativeKernel::ProbsFill => vec![
                buf("meta_all", Elem::I32, Read),
                buf("cursor", Elem::I32, ReadWrite),
                buf("keys", Elem::I32, Write),
                buf("order", Elem::I32, Write),
                int("top_k"),
            ],
            NativeKernel::ProbsMerge => vec![
                buf("keys", Elem::I32, Read),
                buf("order", Elem::I32, Read),
                buf("starts", Elem::I32, Read),
                buf("keys_out", Elem::I32, Write),
                buf("order_out", Elem::I32, Write),
                int("experts"),
                int("shift"),
            ],
            NativeKernel::AssignKeepProbs => vec![
                buf("order", Elem::I32, Read),
                buf("starts", Elem::I32, Read),
                buf("dest_rank", Elem::I32, Read),
                buf("dest_local", Elem::I32, Read),
                buf("table", Elem::I32, ReadWrite),
                buf("kept_own", Elem::U8, Write),
                int("group"),
                int("me"),
                int("tokens"),
                int("top_k"),
                int("experts"),
                int("chunk_tokens"),
                int("max_local"),
                int("capacity"),
            ],
            NativeKernel::AssignSlots => vec![
                buf("ids", Elem::I32, Read),
                buf("table", Elem::I32, Read),
                buf("keep_own", Elem::I32, Read),
                buf("kept_own", Elem::U8, Read),
                buf("dest_rank", Elem::I32, Read),
                buf("dest_local", Elem::I32, Read),
                buf("slots", Elem::I32, Write),
                buf("stats", Elem::I32, ReadWrite),
                int("group"),
                int("me"),
                int("tokens"),
                int("top_k"),
                int("experts"),
                int("chunk_tokens"),
                int("chunks"),
                int("max_local"),
                int("probs"),
            ],
            NativeKernel::AssignOverflow => vec![
                buf("table", Elem::I32, Read),
                buf("flag", Elem::U8, Write),
                int("group"),
                int("me"),
                int("chunks"),
                int("max_local"),
                int("expert_rows"),
            ],
            NativeKernel::RouteOffsets => vec![
                buf("table", Elem::I32, Read),
                buf("send_off", Elem::I32, Write),
                buf("recv_off", Elem::I32, Write),
                int("group"),
                int("max_local"),
                int("padded"),
            ],
            NativeKernel::AssignExpand => vec![
                buf("picks", Elem::I32, Read),
                buf("frame", Elem::I32, Read),
                buf("index", Elem::I32, Write),
                buf("weights", Elem::F32, Write),
                int("group"),
                int("max_local"),
                int("top_k"),
                int("chunk"),
            ],
            NativeKernel::RouteCopy => vec![
                buf("src", Elem::U8, Read),
                buf("dst", Elem::U8, Write),
                buf("table", Elem::I32, Read),
                buf("send_off", Elem::I32, Read),
                buf("recv_off", Elem::I32, Read),
                int("group"),
                int("me"),
                int("peer"),
                int("chunk"),
                int("max_local"),
                int("dispatch"),
                int("unit_rows"),
                int("row_bytes"),
                int("scale_bytes"),
                int("src_scales"),
                int("dst_scales"),
            ],
            NativeKernel::CopyRuns => vec![
                buf("src", Elem::U8, Read),
                buf("dst", Elem::U8, Write),
                buf("runs", Elem::I32, Read),
            ],
        }
    }
}

/// The widths `2^shift` of the `drop = probs` merge launches for a group
/// of `assignments` assignments: `0..` the first shift whose width covers
/// them all (no expert's bucket is larger), so after the launches every
/// bucket is one sorted run; none for one assignment or none.
pub fn probs_merge_shifts(assignments: u64) -> std::ops::Range<u32> {
    let shifts = assignments
        .checked_next_power_of_two()
        .map_or(u64::BITS, u64::trailing_zeros);
    0..shifts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter lists here are the ones in the source, in order.
    #[test]
    fn params_match_the_source() {
        for k in NativeKernel::ALL {
            let sym = format!("extern \"C\" __global__ void {}(", k.symbol());
            let at = SOURCE.find(&sym).unwrap_or_else(|| panic!("{sym} missing"));
            let rest = &SOURCE[at + sym.len()..];
            let sig = &rest[..rest.find(')').unwrap_or(rest.len())];
            let names: Vec<String> = sig
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    let name = p.rsplit([' ', '*']).next().unwrap_or("");
                    name.to_string()
                })
                .filter(|n| !n.ends_with("_len"))
                .collect();
            let mut want: Vec<String> = Vec::new();
            for (i, p) in k.params().iter().enumerate() {
                match p.kind {
                    ParamKind::Buffer { .. } => want.push(format!("p{i}_{}", p.name)),
                    ParamKind::Scalar(_) => want.push(p.name.clone()),
                }
            }
            want.push("moec_rows".into());
            want.push("moec_status".into());
            assert_eq!(names, want, "{}", k.symbol());
        }
    }

    #[test]
    fn merge_widths_cover_every_bucket() {
        assert!(probs_merge_shifts(0).is_empty());
        assert!(probs_merge_shifts(1).is_empty());
        assert_eq!(probs_merge_shifts(2), 0..1);
        assert_eq!(probs_merge_shifts(5), 0..3);
        assert_eq!(probs_merge_shifts(1 << 18), 0..18);
        assert_eq!(probs_merge_shifts(u64::MAX), 0..64);
    }

    #[test]
    fn the_source_includes_no_header() {
        assert!(!SOURCE.contains("#include"));
    }
}
