//! What an imported layer says, before it is written out: every value with
//! the comment that says where it came from.

/// A value with the comment written after it on its line.
#[derive(Clone)]
pub(super) struct Noted<T> {
    pub(super) value: T,
    pub(super) note: Option<String>,
}

pub(super) fn noted<T>(value: T, note: impl Into<String>) -> Noted<T> {
    Noted {
        value,
        note: Some(note.into()),
    }
}

pub(super) fn plain<T>(value: T) -> Noted<T> {
    Noted { value, note: None }
}

pub(super) struct ExpertsOut {
    pub(super) comment: Vec<String>,
    pub(super) count: Noted<u64>,
    pub(super) ffn: Noted<&'static str>,
    pub(super) intermediate: Noted<u64>,
    pub(super) bias: bool,
    pub(super) swiglu_limit: Option<Noted<f64>>,
}

impl ExpertsOut {
    /// SwiGLU experts without biases or a clamp, as most families have them.
    pub(super) fn swiglu(
        comment: Vec<String>,
        count: Noted<u64>,
        intermediate: Noted<u64>,
    ) -> ExpertsOut {
        ExpertsOut {
            comment,
            count,
            ffn: plain("swiglu"),
            intermediate,
            bias: false,
            swiglu_limit: None,
        }
    }
}

pub(super) struct SharedOut {
    pub(super) comment: Vec<String>,
    pub(super) count: Noted<u64>,
    pub(super) intermediate: Noted<u64>,
    pub(super) sigmoid_gate: bool,
}

pub(super) struct GroupsOut {
    pub(super) count: Noted<u64>,
    pub(super) kept: Noted<u64>,
    pub(super) score: &'static str,
}

pub(super) struct RouterOut {
    pub(super) comment: Vec<String>,
    pub(super) scoring: Noted<&'static str>,
    pub(super) top_k: Noted<u64>,
    /// gpt-oss, Switch with `router_bias`: the router `Linear` has a bias,
    /// part of the logits.
    pub(super) logit_bias: Option<Noted<bool>>,
    pub(super) softmax_over: Option<&'static str>,
    pub(super) selection_bias: Option<Noted<bool>>,
    pub(super) groups: Option<GroupsOut>,
    pub(super) normalize: Option<Noted<bool>>,
    pub(super) scale: Option<Noted<f64>>,
    pub(super) weight_on_input: bool,
}

pub(super) enum CapacityOut {
    Dropless,
    Slots(Noted<u64>),
    Factor(Noted<f64>),
}

/// Everything the generated layer says, before it is written out.
pub(super) struct Model {
    pub(super) name: String,
    /// "Mixtral (MixtralForCausalLM)".
    pub(super) title: String,
    /// Extra sentences for the header comment.
    pub(super) about: Vec<String>,
    pub(super) hidden: Noted<u64>,
    pub(super) experts: ExpertsOut,
    pub(super) shared: Option<SharedOut>,
    pub(super) router: RouterOut,
    pub(super) capacity: CapacityOut,
}
