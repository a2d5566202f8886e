//! The CUDA backend behind a Python `Layer`: the backend holds a CUDA
//! context and device pointers, which stay on the thread that made them, so
//! a thread of its own owns it and runs each pass the `Layer` sends it.

use moec_runtime::cuda::{CudaBackend, CudaOptions};
use moec_runtime::weights::LayerWeights;
use moec_runtime::{Forward, Plan};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

type Reply = Sender<Result<Forward, String>>;

/// A CUDA backend on its own thread.
pub struct CudaLayer {
    requests: Option<Sender<(Vec<Vec<f32>>, Reply)>>,
    worker: Option<JoinHandle<()>>,
    /// Where it runs (`CudaBackend::describe`).
    pub device: String,
}

impl CudaLayer {
    /// Prepares `plan` with `weights` on the GPU (every rank a virtual rank
    /// of this process's GPU); the backend's error when there is no driver,
    /// no GPU, or the plan cannot run there.
    pub fn new(plan: Plan, weights: LayerWeights) -> Result<CudaLayer, String> {
        let (requests, incoming) = channel::<(Vec<Vec<f32>>, Reply)>();
        let (ready, started) = channel::<Result<String, String>>();
        let worker = std::thread::Builder::new()
            .name("moec-cuda".into())
            .spawn(move || serve(plan, weights, ready, incoming))
            .map_err(|e| format!("cannot start the CUDA thread: {e}"))?;
        let device = match started.recv() {
            Ok(Ok(device)) => device,
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => {
                let _ = worker.join();
                return Err("the CUDA thread stopped before the backend was ready".into());
            }
        };
        Ok(CudaLayer {
            requests: Some(requests),
            worker: Some(worker),
            device,
        })
    }

    /// One pass (the inputs are copied: they go to the device anyway).
    pub fn forward(&self, inputs: &[&[f32]]) -> Result<Forward, String> {
        let requests = self
            .requests
            .as_ref()
            .ok_or("the CUDA backend was shut down")?;
        let (reply, answer) = channel();
        let owned = inputs.iter().map(|s| s.to_vec()).collect();
        requests
            .send((owned, reply))
            .map_err(|_| "the CUDA thread has stopped".to_string())?;
        answer
            .recv()
            .map_err(|_| "the CUDA thread stopped during the pass".to_string())?
    }
}

impl Drop for CudaLayer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; it frees the backend.
        self.requests = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn serve(
    plan: Plan,
    weights: LayerWeights,
    ready: Sender<Result<String, String>>,
    incoming: Receiver<(Vec<Vec<f32>>, Reply)>,
) {
    let mut backend = match CudaBackend::new(plan, &weights, CudaOptions::default()) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    drop(weights);
    if ready.send(Ok(backend.describe())).is_err() {
        return;
    }
    for (inputs, reply) in incoming {
        let _ = reply.send(backend.forward(&inputs).map_err(|e| e.to_string()));
    }
}
