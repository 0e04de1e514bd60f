//! The model on a thread of its own, answering several documents at once (documents in flight).
//! Each document's thread holds a [`Hosted`]: a [`TextModel`] that hands its calls to the
//! model's thread and waits for the replies. The model's thread serves the calls of every
//! document as one stream ([`TextModel::serve`]): their requests decode in the same steps, each
//! prefilled in turn as a row frees, so a step reads the weights once for all the documents.
//! What else a document asks of the model (a page to transcribe, the memory plan) runs there
//! between steps.
//!
//! A document's checks (deadline, shutdown, a lost lease) run on its own thread, as they would
//! with the model to itself: the model's thread tells it of every prefill chunk and decode step
//! of its requests ([`Reply::Checked`]) and drops the requests of a document that gave up.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use image::RgbImage;

use super::{
    Completion, DecodeOptions, ModelInfo, Next, OcrOptions, Request, Requests, StopCheck, TextModel, Transcription, Work,
};
use crate::constrain::Schema;
use crate::tokenizer::Tokenizer;

/// Work for the model's thread.
enum Call {
    /// A document's requests, answered through its caller.
    Complete { requests: Vec<Owned>, caller: Arc<Caller> },
    /// Anything else that needs the model.
    Run(Work),
}

/// A request whose data the model's thread holds.
struct Owned {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    keep_prefix: bool,
    options: DecodeOptions,
    schema: Option<Schema>,
    think_budget: Option<usize>,
}

impl Owned {
    fn of(r: &Request) -> Self {
        Self {
            prefix: r.prefix.to_vec(),
            suffix: r.suffix.to_vec(),
            keep_prefix: r.keep_prefix,
            options: r.options.clone(),
            schema: r.schema.cloned(),
            think_budget: r.think_budget,
        }
    }
}

/// What the model's thread tells a document's thread about its request (by index in the call).
enum Reply {
    /// A prefill chunk of this many prompt tokens ran.
    Prefilled(usize, usize),
    /// A prefill chunk or a decode step is about to run: check.
    Checked(usize),
    /// The request ended.
    Done(usize, Result<Completion>),
}

/// The document thread that made a call, as the model's thread sees it.
struct Caller {
    replies: Mutex<Sender<Reply>>,
    /// The document stopped waiting (a check failed, or a request did): drop its requests.
    gave_up: AtomicBool,
    /// Most of its requests decoding at once: what its memory plan holds.
    width: usize,
    /// Its requests started and not done.
    started: AtomicUsize,
}

impl Caller {
    fn tell(&self, reply: Reply) {
        // A caller that gave up no longer listens; that is all a failed send means.
        let _ = self.replies.lock().unwrap_or_else(|p| p.into_inner()).send(reply);
    }
}

/// The model as a document's thread uses it while the model serves several documents.
pub struct Hosted {
    calls: Sender<Call>,
    info: Arc<(ModelInfo, Tokenizer)>,
}

/// Serves calls from [`Hosted`] models while `body` runs; `width` requests decode together, of
/// up to `documents` documents (the model keeps each one's prefix state). `failed` is called if
/// the model's thread stops before `body` is done (an error or a panic in the model): the calls
/// still waiting fail, and the caller stops making more. Returns what `body` returns once the
/// model's thread has answered every call and stopped.
pub fn serve<R>(
    model: &mut (dyn TextModel + Send),
    width: usize,
    documents: usize,
    failed: &(dyn Fn() + Sync),
    body: impl FnOnce(&dyn Fn() -> Hosted) -> R,
) -> Result<R> {
    let (calls, received) = channel();
    let info = Arc::new((model.info().clone(), model.tokenizer().clone()));
    std::thread::scope(|s| {
        let server = std::thread::Builder::new().name("model".into()).spawn_scoped(s, move || {
            let served = catch_unwind(AssertUnwindSafe(|| model.serve(&mut Queue::new(received, documents), width)));
            let served = served.unwrap_or_else(|_| Err(anyhow!("the model thread panicked")));
            if served.is_err() {
                failed();
            }
            served
        })?;
        let made = move || Hosted { calls: calls.clone(), info: info.clone() };
        let r = body(&made);
        drop(made);
        server.join().map_err(|_| anyhow!("the model thread panicked"))??;
        Ok(r)
    })
}

/// The calls of every document as one [`Requests`] stream, in the order they came.
struct Queue {
    calls: Receiver<Call>,
    /// No [`Hosted`] is left: no call will come.
    closed: bool,
    documents: usize,
    next_id: usize,
    waiting: VecDeque<usize>,
    runs: VecDeque<Work>,
    jobs: HashMap<usize, Job>,
}

/// A request the model's thread holds, with the callbacks its [`Request`] lends.
struct Job {
    owned: Owned,
    index: usize,
    caller: Arc<Caller>,
    check: Box<dyn Fn() -> Result<()>>,
    on_prefill: Box<dyn Fn(usize)>,
}

impl Queue {
    fn new(calls: Receiver<Call>, documents: usize) -> Self {
        let (waiting, runs, jobs) = (VecDeque::new(), VecDeque::new(), HashMap::new());
        Self { calls, closed: false, documents, next_id: 0, waiting, runs, jobs }
    }

    fn take(&mut self, call: Call) {
        let Call::Complete { requests, caller } = call else {
            if let Call::Run(work) = call {
                self.runs.push_back(work);
            }
            return;
        };
        for (index, owned) in requests.into_iter().enumerate() {
            let (checked, prefilled) = (caller.clone(), caller.clone());
            let check = Box::new(move || {
                if checked.gave_up.load(Ordering::SeqCst) {
                    bail!("the document stopped waiting for this request");
                }
                checked.tell(Reply::Checked(index));
                Ok(())
            });
            let on_prefill = Box::new(move |n| prefilled.tell(Reply::Prefilled(index, n)));
            let id = self.next_id;
            self.next_id += 1;
            self.jobs.insert(id, Job { owned, index, caller: caller.clone(), check, on_prefill });
            self.waiting.push_back(id);
        }
    }
}

impl Requests for Queue {
    fn next(&mut self, idle: bool) -> Next {
        loop {
            match self.calls.try_recv() {
                Ok(call) => self.take(call),
                Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
                Err(TryRecvError::Empty) if idle && self.waiting.is_empty() && self.runs.is_empty() => {
                    // Nothing to do until a call comes: wait for it.
                    match self.calls.recv() {
                        Ok(call) => self.take(call),
                        Err(_) => self.closed = true,
                    }
                    if self.closed {
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if let Some(work) = self.runs.pop_front() {
            return Next::Run(work);
        }
        // The requests of a document that gave up go before they start.
        let jobs = &mut self.jobs;
        self.waiting.retain(|id| {
            let wanted = !jobs[id].caller.gave_up.load(Ordering::SeqCst);
            if !wanted {
                jobs.remove(id);
            }
            wanted
        });
        // The first request whose document has a row left in its plan.
        let ready = self.waiting.iter().position(|id| {
            let c = &self.jobs[id].caller;
            c.started.load(Ordering::SeqCst) < c.width
        });
        if let Some(id) = ready.and_then(|at| self.waiting.remove(at)) {
            self.jobs[&id].caller.started.fetch_add(1, Ordering::SeqCst);
            return Next::Start(id);
        }
        if self.closed && self.waiting.is_empty() { Next::End } else { Next::Later }
    }

    fn request(&self, id: usize) -> Request<'_> {
        let j = &self.jobs[&id];
        Request {
            prefix: &j.owned.prefix,
            suffix: &j.owned.suffix,
            keep_prefix: j.owned.keep_prefix,
            options: &j.owned.options,
            check: &*j.check,
            on_prefill: &*j.on_prefill,
            schema: j.owned.schema.as_ref(),
            think_budget: j.owned.think_budget,
        }
    }

    fn done(&mut self, id: usize, reply: Result<Completion>) {
        if let Some(j) = self.jobs.remove(&id) {
            j.caller.started.fetch_sub(1, Ordering::SeqCst);
            j.caller.tell(Reply::Done(j.index, reply));
        }
    }

    fn documents(&self) -> usize {
        self.documents
    }
}

impl Hosted {
    /// Runs `work` on the model's thread between steps and returns its answer.
    fn ask<T: Send + 'static>(&self, work: impl FnOnce(&mut dyn TextModel) -> T + Send + 'static) -> Result<T> {
        let (answer, answered) = channel();
        let work = Box::new(move |m: &mut dyn TextModel| {
            let _ = answer.send(work(m));
        });
        self.calls.send(Call::Run(work)).map_err(|_| anyhow!("the model thread stopped"))?;
        answered.recv().map_err(|_| anyhow!("the model thread stopped"))
    }

    /// A question about the memory plan, answered by the model between steps. Once its thread
    /// is gone the answer is the type's default; the document's next model call fails then,
    /// saying why.
    fn plan<T: Send + Default + 'static>(&self, question: impl FnOnce(&dyn TextModel) -> T + Send + 'static) -> T {
        self.ask(move |m| question(m)).unwrap_or_default()
    }
}

impl TextModel for Hosted {
    fn info(&self) -> &ModelInfo {
        &self.info.0
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.info.1
    }

    fn complete(&mut self, req: &Request) -> Result<Completion> {
        let mut replies = self.complete_batch(std::slice::from_ref(req), 1, &mut |_, _| {})?;
        replies.pop().ok_or_else(|| anyhow!("the model thread gave no reply"))
    }

    /// Hands the requests to the model's thread, which decodes up to `width` of them at once
    /// with the other documents' (within its own width), and runs the checks and progress of
    /// each as it is told.
    fn complete_batch(
        &mut self,
        reqs: &[Request],
        width: usize,
        done: &mut dyn FnMut(usize, &Completion),
    ) -> Result<Vec<Completion>> {
        let (replies, received) = channel();
        let caller = Arc::new(Caller {
            replies: Mutex::new(replies),
            gave_up: AtomicBool::new(false),
            width: width.max(1),
            started: AtomicUsize::new(0),
        });
        let requests = reqs.iter().map(Owned::of).collect();
        self.calls.send(Call::Complete { requests, caller: caller.clone() }).map_err(|_| anyhow!("the model thread stopped"))?;
        let give_up = |e: anyhow::Error| {
            caller.gave_up.store(true, Ordering::SeqCst);
            Err(e)
        };
        let mut out: Vec<Option<Completion>> = vec![None; reqs.len()];
        let mut left = reqs.len();
        while left > 0 {
            let Ok(reply) = received.recv() else { return give_up(anyhow!("the model thread stopped")) };
            match reply {
                Reply::Prefilled(i, n) => (reqs[i].on_prefill)(n),
                Reply::Checked(i) => {
                    if let Err(e) = (reqs[i].check)() {
                        return give_up(e);
                    }
                }
                Reply::Done(i, Ok(c)) => {
                    done(i, &c);
                    out[i] = Some(c);
                    left -= 1;
                }
                Reply::Done(_, Err(e)) => return give_up(e),
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn serve(&mut self, requests: &mut dyn Requests, _: usize) -> Result<()> {
        super::serve_in_turn(self, requests)
    }

    /// Transcribes on the model's thread between steps; `check` runs here at each of the
    /// transcription's chunks and tokens, as the model's thread tells them.
    fn transcribe(&mut self, page: &RgbImage, label: &str, opts: &OcrOptions, check: StopCheck) -> Result<Transcription> {
        let (page, label, opts) = (page.clone(), label.to_string(), opts.clone());
        let (told, heard) = channel::<Option<Result<Transcription>>>();
        let gave_up = Arc::new(AtomicBool::new(false));
        let given_up = gave_up.clone();
        let work = Box::new(move |m: &mut dyn TextModel| {
            let at_step = || {
                if given_up.load(Ordering::SeqCst) {
                    bail!("the document stopped waiting for this page");
                }
                let _ = told.send(None);
                Ok(())
            };
            let t = m.transcribe(&page, &label, &opts, &at_step);
            let _ = told.send(Some(t));
        });
        self.calls.send(Call::Run(work)).map_err(|_| anyhow!("the model thread stopped"))?;
        loop {
            match heard.recv() {
                Ok(None) => {
                    if let Err(e) = check() {
                        gave_up.store(true, Ordering::SeqCst);
                        return Err(e);
                    }
                }
                Ok(Some(t)) => return t,
                Err(_) => bail!("the model thread stopped"),
            }
        }
    }

    fn planned_bytes(&self, context: usize, snapshot: bool) -> u64 {
        self.plan(move |m| m.planned_bytes(context, snapshot))
    }

    fn max_context_within(&self, budget: u64, snapshot: bool) -> Option<usize> {
        self.plan(move |m| m.max_context_within(budget, snapshot))
    }

    fn sequence_bytes(&self, context: usize) -> u64 {
        self.plan(move |m| m.sequence_bytes(context))
    }
}
