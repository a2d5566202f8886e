//! Communication between ranks: the [`Comm`] trait and its in-process
//! implementation, where every rank is a thread of one process.
//!
//! Every collective of a plan (all-to-all, all-to-all-v, the count exchange,
//! all-gather, the hierarchical legs) is one [`Comm::exchange`]: each rank
//! says which byte runs of its send buffer go to each peer and where the runs
//! from each peer land in its receive buffer. That is NCCL's grouped
//! send/receive, and it is what a GPU implementation issues too.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A byte range of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: usize,
    pub len: usize,
}

/// Identifies one collective call across ranks: the group (its first global
/// rank), the forward pass, the op and the exchange within the op (a
/// hierarchical leg exchanges sizes and routing before the rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag {
    pub group: usize,
    pub pass: u64,
    pub op: u32,
    pub part: u8,
}

/// What one rank sends: its bytes and, per peer (index in the group), the
/// runs that peer receives, in order.
pub struct Outgoing<'a> {
    pub data: &'a [u8],
    pub to: Vec<Vec<Run>>,
}

/// Where one rank receives: per peer, the runs of `data` that peer's bytes
/// fill, in order. The total length must equal what the peer sends.
pub struct Incoming<'a> {
    pub data: &'a mut [u8],
    pub from: Vec<Vec<Run>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommError {
    /// Another rank failed; its message.
    Aborted(String),
    /// Peers did not arrive in time.
    Timeout { tag: Tag, missing: Vec<usize> },
    /// Send and receive sides disagree.
    Mismatch(String),
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommError::Aborted(why) => write!(f, "aborted because another rank failed: {why}"),
            CommError::Timeout { tag, missing } => write!(
                f,
                "timed out waiting for ranks {missing:?} at op {} (pass {})",
                tag.op, tag.pass
            ),
            CommError::Mismatch(why) => write!(f, "collective mismatch: {why}"),
        }
    }
}

impl std::error::Error for CommError {}

/// Moves bytes between the ranks of a group.
pub trait Comm: Send + Sync {
    /// One grouped exchange. `group` lists the global ranks of the group in
    /// order, `me` is the caller's index in it. Returns when the caller's
    /// receive buffer is complete and no peer still reads its send buffer.
    fn exchange(
        &self,
        tag: Tag,
        group: &[usize],
        me: usize,
        out: Outgoing<'_>,
        inc: Incoming<'_>,
    ) -> Result<(), CommError>;

    /// Makes every pending and future exchange fail with `why`, so that no
    /// rank waits forever for one that failed.
    fn abort(&self, why: &str);
}

/// A posted send buffer: its address, length and runs per peer.
struct Posting {
    addr: usize,
    len: usize,
    to: Vec<Vec<Run>>,
}

#[derive(Default)]
struct Slot {
    posted: Vec<Option<Posting>>,
    done: usize,
    left: usize,
}

#[derive(Default)]
struct State {
    failed: Option<String>,
    slots: BTreeMap<Tag, Slot>,
}

/// Ranks as threads of this process; exchanges are memory copies.
pub struct InProcessComm {
    state: Mutex<State>,
    changed: Condvar,
    timeout: Duration,
}

impl InProcessComm {
    /// `timeout` bounds how long a rank waits for its peers at one exchange.
    pub fn new(timeout: Duration) -> InProcessComm {
        InProcessComm {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would poison it; the state stays
        // consistent (every update is a single assignment), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `ready(slot)` holds, or the comm failed, or time ran out.
    fn wait_for<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        tag: Tag,
        group: usize,
        ready: impl Fn(&Slot) -> bool,
    ) -> Result<MutexGuard<'a, State>, CommError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(why) = &state.failed {
                return Err(CommError::Aborted(why.clone()));
            }
            match state.slots.get(&tag) {
                Some(slot) if ready(slot) => return Ok(state),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let missing = state
                    .slots
                    .get(&tag)
                    .map(|s| {
                        (0..group)
                            .filter(|&i| s.posted.get(i).is_none_or(Option::is_none))
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(CommError::Timeout { tag, missing });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Comm for InProcessComm {
    fn exchange(
        &self,
        tag: Tag,
        group: &[usize],
        me: usize,
        out: Outgoing<'_>,
        inc: Incoming<'_>,
    ) -> Result<(), CommError> {
        let n = group.len();
        if out.to.len() != n || inc.from.len() != n || me >= n {
            return Err(CommError::Mismatch(format!(
                "a group of {n} ranks needs {n} run lists each way"
            )));
        }
        check_runs(&out.to, out.data.len(), "send")?;
        check_runs(&inc.from, inc.data.len(), "receive")?;
        // Post the send buffer.
        let mut state = self.lock();
        {
            let slot = state.slots.entry(tag).or_default();
            if slot.posted.is_empty() {
                slot.posted = (0..n).map(|_| None).collect();
            }
            if slot.posted.len() != n {
                return Err(CommError::Mismatch(format!(
                    "op {} is called with groups of different sizes",
                    tag.op
                )));
            }
            slot.posted[me] = Some(Posting {
                addr: out.data.as_ptr() as usize,
                len: out.data.len(),
                to: out.to,
            });
        }
        self.changed.notify_all();
        let state = self.wait_for(state, tag, n, |s| s.posted.iter().all(Option::is_some))?;
        // Note where every peer's runs for me are, then copy without the lock,
        // so that exchanges of other groups and ranks proceed meanwhile.
        let sources: Result<Vec<Source>, CommError> = match state.slots.get(&tag) {
            Some(slot) => slot
                .posted
                .iter()
                .enumerate()
                .map(|(p, post)| match post {
                    Some(post) => Ok(Source {
                        addr: post.addr,
                        len: post.len,
                        runs: post.to.get(me).cloned().unwrap_or_default(),
                    }),
                    None => Err(CommError::Mismatch(format!("peer {p} did not post"))),
                })
                .collect(),
            None => Err(CommError::Mismatch("the exchange vanished".into())),
        };
        drop(state);
        let result = sources.and_then(|sources| pull(&sources, inc));
        let mut state = self.lock();
        if let Some(slot) = state.slots.get_mut(&tag) {
            slot.done += 1;
        }
        self.changed.notify_all();
        // Nobody may reuse its send buffer until every peer has copied from it.
        let mut state = self.wait_for(state, tag, n, |s| s.done == n)?;
        if let Some(slot) = state.slots.get_mut(&tag) {
            slot.left += 1;
            if slot.left == n {
                state.slots.remove(&tag);
            }
        }
        result
    }

    fn abort(&self, why: &str) {
        let mut state = self.lock();
        if state.failed.is_none() {
            state.failed = Some(why.to_string());
        }
        drop(state);
        self.changed.notify_all();
    }
}

fn check_runs(runs: &[Vec<Run>], len: usize, side: &str) -> Result<(), CommError> {
    for r in runs.iter().flatten() {
        if r.offset.checked_add(r.len).is_none_or(|end| end > len) {
            return Err(CommError::Mismatch(format!(
                "a {side} run of {} bytes at {} lies outside the {len}-byte buffer",
                r.len, r.offset
            )));
        }
    }
    Ok(())
}

/// A peer's posted send buffer and its runs for the caller.
struct Source {
    addr: usize,
    len: usize,
    runs: Vec<Run>,
}

/// Copies, for each peer, its runs addressed to the caller into `inc`'s runs.
fn pull(sources: &[Source], inc: Incoming<'_>) -> Result<(), CommError> {
    for (p, dst_runs) in inc.from.iter().enumerate() {
        let Some(post) = sources.get(p) else {
            return Err(CommError::Mismatch(format!("peer {p} did not post")));
        };
        // SAFETY: `addr, len` is the peer's send buffer, posted for this
        // exchange and kept alive and unmodified by the peer until every rank
        // has counted itself done (the peer waits for `done == n` before
        // returning, and this rank counts itself done only after this copy).
        // The runs were checked against `len` when they were posted.
        let src = unsafe { std::slice::from_raw_parts(post.addr as *const u8, post.len) };
        copy_runs(src, &post.runs, inc.data, dst_runs)
            .map_err(|why| CommError::Mismatch(format!("from peer {p}: {why}")))?;
    }
    Ok(())
}

/// Copies the bytes of `src_runs` of `src`, as one stream, into `dst_runs` of `dst`.
pub fn copy_runs(
    src: &[u8],
    src_runs: &[Run],
    dst: &mut [u8],
    dst_runs: &[Run],
) -> Result<(), String> {
    let total_src: usize = src_runs.iter().map(|r| r.len).sum();
    let total_dst: usize = dst_runs.iter().map(|r| r.len).sum();
    if total_src != total_dst {
        return Err(format!(
            "{total_src} bytes sent but {total_dst} bytes expected"
        ));
    }
    let mut si = 0;
    let mut s_off = 0;
    for d in dst_runs {
        let mut filled = 0;
        while filled < d.len {
            let Some(s) = src_runs.get(si) else {
                return Err("ran out of send runs".into());
            };
            let take = (s.len - s_off).min(d.len - filled);
            let from = s.offset + s_off;
            let to = d.offset + filled;
            let (Some(src_bytes), Some(dst_bytes)) =
                (src.get(from..from + take), dst.get_mut(to..to + take))
            else {
                return Err("a run lies outside its buffer".into());
            };
            dst_bytes.copy_from_slice(src_bytes);
            filled += take;
            s_off += take;
            if s_off == s.len {
                si += 1;
                s_off = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn four_ranks_all_to_all() {
        let comm = Arc::new(InProcessComm::new(Duration::from_secs(10)));
        let group: Vec<usize> = (0..4).collect();
        std::thread::scope(|scope| {
            for me in 0..4 {
                let comm = comm.clone();
                let group = group.clone();
                scope.spawn(move || {
                    // Rank `me` sends byte 10*me+p to peer p.
                    let send: Vec<u8> = (0..4).map(|p| (10 * me + p) as u8).collect();
                    let mut recv = vec![0u8; 4];
                    let to = (0..4).map(|p| vec![Run { offset: p, len: 1 }]).collect();
                    let from = (0..4).map(|p| vec![Run { offset: p, len: 1 }]).collect();
                    let tag = Tag {
                        group: 0,
                        pass: 0,
                        op: 7,
                        part: 0,
                    };
                    comm.exchange(
                        tag,
                        &group,
                        me,
                        Outgoing { data: &send, to },
                        Incoming {
                            data: &mut recv,
                            from,
                        },
                    )
                    .unwrap();
                    let want: Vec<u8> = (0..4).map(|p| (10 * p + me) as u8).collect();
                    assert_eq!(recv, want);
                });
            }
        });
    }

    #[test]
    fn abort_releases_waiting_ranks() {
        let comm = Arc::new(InProcessComm::new(Duration::from_secs(60)));
        let start = Instant::now();
        std::thread::scope(|scope| {
            let c = comm.clone();
            let waiter = scope.spawn(move || {
                let send = [1u8];
                let mut recv = [0u8; 2];
                c.exchange(
                    Tag {
                        group: 0,
                        pass: 0,
                        op: 1,
                        part: 0,
                    },
                    &[0, 1],
                    0,
                    Outgoing {
                        data: &send,
                        to: vec![vec![], vec![Run { offset: 0, len: 1 }]],
                    },
                    Incoming {
                        data: &mut recv,
                        from: vec![vec![], vec![Run { offset: 0, len: 1 }]],
                    },
                )
            });
            std::thread::sleep(Duration::from_millis(50));
            comm.abort("rank 1 failed");
            let r = waiter.join().unwrap();
            assert!(matches!(r, Err(CommError::Aborted(_))), "{r:?}");
        });
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn runs_split_across_boundaries() {
        let src = [1u8, 2, 3, 4, 5];
        let mut dst = [0u8; 6];
        copy_runs(
            &src,
            &[Run { offset: 0, len: 2 }, Run { offset: 3, len: 2 }],
            &mut dst,
            &[Run { offset: 1, len: 3 }, Run { offset: 5, len: 1 }],
        )
        .unwrap();
        assert_eq!(dst, [0, 1, 2, 4, 0, 5]);
    }
}
