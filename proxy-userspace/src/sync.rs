//! One reconciliation pass: desired vs programmed, applied step by step.
//! A step that fails is rolled back (when it had not yet committed) and
//! reported by the name of the object it was for; every other step still
//! lands, and nothing already programmed is lost.
use crate::{
    diff::{self, Change, Programmed, Step},
    maps::Kernel,
    model::Desired,
};

/// What a pass did.
#[derive(Debug, Default)]
pub struct Report {
    pub upserted: usize,
    pub removed: usize,
    pub ops: usize,
    /// One message per failed step, naming its object.
    pub errors: Vec<String>,
}

/// Apply one step; on failure before its commit point, undo what landed.
fn run_step(kernel: &mut impl Kernel, prog: &mut Programmed, step: &Step, report: &mut Report) -> bool {
    for (i, op) in step.ops.iter().enumerate() {
        match kernel.apply(op) {
            Ok(()) => {
                prog.apply(op);
                report.ops += 1;
            }
            Err(e) => {
                if i <= step.commit {
                    for undo in &step.rollback {
                        // Best effort: an undo that fails leaves a slot that
                        // no frontend points at; the next gc removes it.
                        if kernel.apply(undo).is_ok() {
                            prog.apply(undo);
                        }
                    }
                }
                report.errors.push(format!("{}: {e}", step.owner));
                return false;
            }
        }
    }
    true
}

/// Bring the maps (and `prog`, their mirror) to `desired`.
pub fn sync(kernel: &mut impl Kernel, prog: &mut Programmed, desired: &Desired) -> Report {
    let mut report = Report::default();
    for change in diff::changes(prog, desired) {
        match change {
            Change::Upsert(frontend, spec) => match diff::plan_upsert(prog, frontend, spec) {
                Ok(step) => {
                    if run_step(kernel, prog, &step, &mut report) {
                        report.upserted += 1;
                    }
                }
                Err(e) => report.errors.push(e),
            },
            Change::Remove(frontend) => {
                let step = diff::plan_remove(prog, frontend);
                if run_step(kernel, prog, &step, &mut report) {
                    report.removed += 1;
                }
            }
        }
    }
    // Orphan slots first, then the backends they freed.
    for _ in 0..2 {
        let step = diff::plan_gc(prog);
        if !step.ops.is_empty() {
            run_step(kernel, prog, &step, &mut report);
        }
    }
    report
}
