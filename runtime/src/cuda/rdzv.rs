//! The rendezvous of a multi-process run: who this process is, and the NCCL
//! unique id every rank needs, with a timeout.
//!
//! [`Launch::from_env`] reads the variables torchrun sets for each process
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or
//! SLURM's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) when torchrun's
//! are absent. [`exchange`] then runs a small TCP protocol, independent of
//! NCCL and testable without a GPU:
//!
//! - rank 0 listens on `MASTER_ADDR:PORT`, where `PORT` is `MOEC_RDZV_PORT`
//!   or `MASTER_PORT + 1` (torchrun's own store already listens on
//!   `MASTER_PORT`);
//! - every other rank connects (retrying until the deadline) and sends a
//!   hello: magic, its rank, the world size and a hash of its plan;
//! - rank 0 checks every hello (same world, same plan, each rank once) and
//!   answers each with the 128-byte NCCL unique id, or with the reason it
//!   refuses (another rank's plan differs, a rank appears twice, ...).
//!
//! A rank that does not arrive in time is an error naming the missing ranks,
//! not a hang; a rank whose plan differs is an error on every rank.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The NCCL unique id's size (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

const MAGIC: &[u8; 8] = b"MOECRDZ1";

/// This process's place in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    /// The process's index on its node (its GPU is this modulo the GPUs
    /// it sees: `device::choose_ordinal`).
    pub local_rank: usize,
    pub master_addr: String,
    /// Where rank 0 listens for the rendezvous.
    pub port: u16,
}

impl Launch {
    /// The launch the environment describes, `None` for a single process
    /// (no `WORLD_SIZE`, or `WORLD_SIZE=1`).
    pub fn from_env() -> Result<Option<Launch>, String> {
        Launch::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`Launch::from_env`] with the environment as a lookup (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, String> {
        let int = |name: &str| -> Result<Option<usize>, String> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("{name}={v} is not a non-negative integer"))
                })
                .transpose()
        };
        let (rank, world, local) = match int("WORLD_SIZE")? {
            Some(w) => (int("RANK")?, w, int("LOCAL_RANK")?),
            None => match int("SLURM_NTASKS")? {
                Some(w) => (int("SLURM_PROCID")?, w, int("SLURM_LOCALID")?),
                None => return Ok(None),
            },
        };
        if world <= 1 {
            return Ok(None);
        }
        let rank = rank.ok_or("WORLD_SIZE is set but RANK is not")?;
        if rank >= world {
            return Err(format!("RANK={rank} is not below WORLD_SIZE={world}"));
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_string());
        let port = match int("MOEC_RDZV_PORT")? {
            Some(p) => p,
            None => {
                let master = int("MASTER_PORT")?
                    .ok_or("WORLD_SIZE is set but MASTER_PORT is not (or set MOEC_RDZV_PORT)")?;
                master + 1
            }
        };
        let port = u16::try_from(port).map_err(|_| format!("port {port} is out of range"))?;
        Ok(Some(Launch {
            rank,
            world,
            local_rank: local.unwrap_or(0),
            master_addr,
            port,
        }))
    }
}

/// Whether this process's ranks talk over NCCL by the environment: a
/// multi-process launch, or `MOEC_COMM=nccl` (as the CUDA backend's
/// default `CommChoice::Auto` decides; an unreadable launch counts as one,
/// so its error comes from the backend).
pub fn nccl_from_env() -> bool {
    match std::env::var("MOEC_COMM").ok().as_deref() {
        Some("nccl") => true,
        Some("virtual") => false,
        _ => !matches!(Launch::from_env(), Ok(None)),
    }
}

/// A 64-bit FNV-1a hash (plans are compared by the hash of their JSON).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn io(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("rendezvous: {what}: {e}")
}

/// Runs the rendezvous: rank 0 passes `id` (the NCCL unique id it made) and
/// gets it back once every rank has checked in; the others pass `None` and
/// get rank 0's. `plan` is the hash of this rank's plan.
pub fn exchange(
    launch: &Launch,
    id: Option<[u8; ID_BYTES]>,
    plan: u64,
    timeout: Duration,
) -> Result<[u8; ID_BYTES], String> {
    let deadline = Instant::now() + timeout;
    if launch.rank == 0 {
        let id = id.ok_or("rendezvous: rank 0 needs the NCCL id")?;
        if launch.world == 1 {
            return Ok(id);
        }
        serve(launch, id, plan, deadline)
    } else {
        join(launch, plan, deadline)
    }
}

fn hello(rank: usize, world: usize, plan: u64) -> Vec<u8> {
    let mut m = MAGIC.to_vec();
    m.extend_from_slice(&(rank as u64).to_le_bytes());
    m.extend_from_slice(&(world as u64).to_le_bytes());
    m.extend_from_slice(&plan.to_le_bytes());
    m
}

fn serve(
    launch: &Launch,
    id: [u8; ID_BYTES],
    plan: u64,
    deadline: Instant,
) -> Result<[u8; ID_BYTES], String> {
    let listener = TcpListener::bind(("0.0.0.0", launch.port))
        .map_err(io(&format!("cannot listen on port {}", launch.port)))?;
    listener.set_nonblocking(true).map_err(io("listener"))?;
    let mut peers: Vec<Option<TcpStream>> = (0..launch.world).map(|_| None).collect();
    let mut problem: Option<String> = None;
    while peers.iter().skip(1).any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).map_err(io("peer"))?;
                let left = deadline.saturating_duration_since(Instant::now());
                s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
                    .map_err(io("peer"))?;
                let mut m = [0u8; 32];
                if s.read_exact(&mut m).is_err() || &m[..8] != MAGIC {
                    continue; // not one of ours
                }
                let word = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&m[8 + 8 * i..16 + 8 * i]);
                    u64::from_le_bytes(b)
                };
                let (rank, world, their_plan) = (word(0) as usize, word(1) as usize, word(2));
                let refuse = if world != launch.world {
                    Some(format!(
                        "rank {rank} runs {world} ranks, rank 0 runs {}",
                        launch.world
                    ))
                } else if rank == 0 || rank >= launch.world {
                    Some(format!("a peer claims rank {rank} of {world}"))
                } else if peers[rank].is_some() {
                    Some(format!("rank {rank} checked in twice"))
                } else if their_plan != plan {
                    Some(format!(
                        "rank {rank}'s plan differs from rank 0's (plan hashes {their_plan:016x} and {plan:016x}); build every rank's plan from the same file and options"
                    ))
                } else {
                    None
                };
                match refuse {
                    Some(why) => {
                        let _ = answer(&mut s, Err(&why));
                        problem.get_or_insert(why);
                        if rank < launch.world && rank != 0 && peers[rank].is_none() {
                            // Count it as arrived, so the others are told too.
                            peers[rank] = Some(s);
                        }
                    }
                    None => peers[rank] = Some(s),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (1..launch.world).filter(|&r| peers[r].is_none()).collect();
                    let why = format!(
                        "rendezvous: timed out waiting for ranks {missing:?} on port {}",
                        launch.port
                    );
                    for s in peers.iter_mut().flatten() {
                        let _ = answer(s, Err(&why));
                    }
                    return Err(why);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io("accept")(e)),
        }
    }
    for s in peers.iter_mut().flatten() {
        let _ = answer(s, problem.as_deref().map_or(Ok(&id), Err));
    }
    match problem {
        Some(why) => Err(format!("rendezvous: {why}")),
        None => Ok(id),
    }
}

/// Status byte 0 and the id, or 1 and the reason.
fn answer(s: &mut TcpStream, what: Result<&[u8; ID_BYTES], &str>) -> std::io::Result<()> {
    match what {
        Ok(id) => {
            s.write_all(&[0])?;
            s.write_all(id)
        }
        Err(why) => {
            let b = why.as_bytes();
            s.write_all(&[1])?;
            s.write_all(&(b.len() as u32).to_le_bytes())?;
            s.write_all(b)
        }
    }
}

fn join(launch: &Launch, plan: u64, deadline: Instant) -> Result<[u8; ID_BYTES], String> {
    let target = (launch.master_addr.as_str(), launch.port);
    let mut stream = loop {
        let addrs: Vec<_> = target
            .to_socket_addrs()
            .map_err(io(&format!(
                "cannot resolve MASTER_ADDR {}",
                launch.master_addr
            )))?
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = addrs.iter().find_map(|a| {
            TcpStream::connect_timeout(
                a,
                left.clamp(Duration::from_millis(10), Duration::from_secs(1)),
            )
            .ok()
        });
        if let Some(s) = attempt {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "rendezvous: rank {} timed out connecting to rank 0 at {}:{}",
                launch.rank, launch.master_addr, launch.port
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stream
        .write_all(&hello(launch.rank, launch.world, plan))
        .map_err(io("hello"))?;
    let left = deadline.saturating_duration_since(Instant::now());
    stream
        .set_read_timeout(Some(left.max(Duration::from_millis(10))))
        .map_err(io("peer"))?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).map_err(|e| {
        format!(
            "rendezvous: rank {} got no answer from rank 0 in time: {e}",
            launch.rank
        )
    })?;
    if status[0] == 0 {
        let mut id = [0u8; ID_BYTES];
        stream.read_exact(&mut id).map_err(io("the NCCL id"))?;
        return Ok(id);
    }
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(io("the refusal"))?;
    let len = (u32::from_le_bytes(len) as usize).min(1 << 16);
    let mut why = vec![0u8; len];
    stream.read_exact(&mut why).map_err(io("the refusal"))?;
    Err(format!(
        "rendezvous: rank 0 refused: {}",
        String::from_utf8_lossy(&why)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        let l = Launch::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.port), (3, 8, 3, 29501));
        assert_eq!(l.master_addr, "10.0.0.1");
        let s = Launch::from_vars(vars(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
            ("MOEC_RDZV_PORT", "4000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.rank, s.world, s.port), (1, 2, 4000));
        assert_eq!(Launch::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            Launch::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
            None
        );
        for bad in [
            vec![("WORLD_SIZE", "4")],
            vec![("WORLD_SIZE", "4"), ("RANK", "4"), ("MASTER_PORT", "1")],
            vec![("WORLD_SIZE", "x"), ("RANK", "0")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0")],
            vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
        ] {
            assert!(Launch::from_vars(vars(&bad)).is_err(), "{bad:?}");
        }
    }

    /// A free port on this machine (bind port 0, read it, close).
    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch {
            rank,
            world,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn every_rank_gets_rank_0s_id() {
        let port = free_port();
        let id = [7u8; ID_BYTES];
        let results: Vec<Result<[u8; ID_BYTES], String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|r| {
                    s.spawn(move || {
                        exchange(
                            &launch(r, 4, port),
                            (r == 0).then_some(id),
                            42,
                            Duration::from_secs(20),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            assert_eq!(r.unwrap(), id);
        }
    }

    #[test]
    fn a_different_plan_is_an_error_on_every_rank() {
        let port = free_port();
        let results: Vec<Result<[u8; ID_BYTES], String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let plan = if r == 2 { 1 } else { 42 };
                        exchange(
                            &launch(r, 3, port),
                            (r == 0).then_some([1u8; ID_BYTES]),
                            plan,
                            Duration::from_secs(20),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, res) in results.iter().enumerate() {
            let e = res.as_ref().unwrap_err();
            assert!(e.contains("plan differs"), "rank {r}: {e}");
        }
    }

    #[test]
    fn a_missing_peer_is_a_timeout_not_a_hang() {
        let port = free_port();
        let start = Instant::now();
        let results: Vec<Result<[u8; ID_BYTES], String>> = std::thread::scope(|s| {
            // Ranks 0 and 1 of 3; rank 2 never comes.
            let handles: Vec<_> = (0..2)
                .map(|r| {
                    s.spawn(move || {
                        exchange(
                            &launch(r, 3, port),
                            (r == 0).then_some([1u8; ID_BYTES]),
                            42,
                            Duration::from_millis(600),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            results[0].as_ref().unwrap_err().contains("[2]"),
            "{results:?}"
        );
        assert!(results[1].is_err());
        assert!(start.elapsed() < Duration::from_secs(10));
        // And a rank without rank 0 gives up too.
        let e = exchange(
            &launch(1, 2, free_port()),
            None,
            42,
            Duration::from_millis(300),
        );
        assert!(e.unwrap_err().contains("timed out"));
    }

    #[test]
    fn the_hash_is_fnv1a() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
