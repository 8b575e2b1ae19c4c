//! The evaluation harness of the `snapkv` command-line tool: the synthetic
//! long-context task suite, branching one evaluated prompt into several
//! caches (full and compressed), and the metrics that compare them. The
//! `snapkv demo`, `eval`, `fidelity`, `bench` and `capacity` commands are
//! built on it. It lives beside the library, not in it: applications that
//! compress their caches need none of it.

#![warn(missing_docs)]

pub mod branch;
pub mod metrics;
pub mod tasks;
pub mod trial;

pub use branch::{
    agreement, branch, branch_after_answer_start, continuation_distributions, forced_distributions, method_names,
    seq_usage, teacher_force, Branch, Method, SeqUsage, Snapshot,
};
pub use metrics::{argmax, kl_divergence, log_softmax, Agreement};
pub use tasks::{generate as generate_task, Haystack, PromptLayout, TaskInstance, TaskKind, TaskSizes, TaskSpec};
