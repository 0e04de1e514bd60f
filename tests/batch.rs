//! Several sequences decoded in one step ([`Batch`]) against each decoded alone: the same
//! logits step by step and the same greedy tokens, for sequences of different lengths (one long
//! enough that its attention splits the cache across threads), one joining the batch late and
//! one leaving it early, and a sequence taken out of the batch going on by itself.
//!
//! Tolerance: 1e-4 absolute on the logits (as tests/parity.rs holds fp32 to the reference): a
//! batch row's weights are read by a matmul of B rows instead of one, which may sum in another
//! order; the DeltaNet and attention operators compute each row as alone.

mod common;

use common::*;
use deltadoc::generate::{Batch, Decoder, Logits, argmax};
use deltadoc::model::quant::Precision;
use deltadoc::runtime::SessionOptions;
use deltadoc::snapshot::Snapshot;

const TOL: f32 = 1e-4;
/// Decode steps compared.
const STEPS: usize = 6;
/// Prompt lengths: the last past the length where decode attention splits its keys (2,048).
const LENGTHS: [usize; 3] = [5, 23, 2100];

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 11 + 5) % 200).collect()
}

/// Each sequence's state after its prompt, and its first greedy token.
fn prefilled(dec: &mut Decoder) -> Vec<(Snapshot, u32)> {
    LENGTHS
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            dec.reset().unwrap();
            let logits = dec.forward(&prompt(n, i as u32), Logits::Last).unwrap();
            (dec.snapshot().unwrap(), argmax(logits.row(0).as_slice().unwrap()) as u32)
        })
        .collect()
}

/// Sequence `snap` decoded alone from `first`: the logits of each of `steps` greedy steps.
fn alone(dec: &mut Decoder, snap: &Snapshot, first: u32, steps: usize) -> Vec<Vec<f32>> {
    dec.restore(snap).unwrap();
    let mut token = first;
    (0..steps)
        .map(|_| {
            let l = dec.forward(&[token], Logits::Last).unwrap().row(0).to_vec();
            token = argmax(&l) as u32;
            l
        })
        .collect()
}

#[test]
fn a_batch_decodes_each_sequence_as_it_decodes_alone() {
    for precision in [Precision::Fp32, Precision::Int8, Precision::Int4] {
        let mut dec = Decoder::open(&open(&imported("gqa8", precision)), &SessionOptions::with_threads(2)).unwrap();
        let members = prefilled(&mut dec);
        let want: Vec<Vec<Vec<f32>>> = members.iter().map(|(s, t)| alone(&mut dec, s, *t, STEPS)).collect();
        // Sequences 0 and 2 start, with room for two tokens only (the caches grow on the way);
        // sequence 1 joins at step 2, sequence 0 leaves after step 3.
        let mut batch = Batch::new(&dec, vec![members[0].0.clone(), members[2].0.clone()], 2).unwrap();
        let mut tokens: Vec<u32> = vec![members[0].1, members[2].1];
        // Which sequence each batch row holds, and the step each joined at.
        let mut seqs: Vec<usize> = vec![0, 2];
        let mut joined = [0, 2, 0];
        let mut worst = 0f32;
        for step in 0..STEPS {
            if step == 2 {
                batch.join(&dec, members[1].0.clone(), 2).unwrap();
                seqs.push(1);
                tokens.push(members[1].1);
                joined[1] = step;
            }
            if step == 4 {
                batch.remove(0).unwrap();
                seqs.remove(0);
                tokens.remove(0);
            }
            let logits = batch.step(&mut dec, &tokens, &[]).unwrap();
            assert_eq!(logits.nrows(), seqs.len());
            for (row, &seq) in seqs.iter().enumerate() {
                let got = logits.row(row).to_vec();
                let expected = &want[seq][step - joined[seq]];
                let err = max_abs(&got, expected);
                worst = worst.max(err);
                assert!(err <= TOL, "{precision:?} step {step}, sequence {seq}: max |Δlogit| {err:.3e} > {TOL:e}");
                tokens[row] = argmax(&got) as u32;
                assert_eq!(tokens[row], argmax(expected) as u32, "{precision:?} step {step}, sequence {seq}: greedy token");
                assert_eq!(batch.tokens(row), LENGTHS[seq] + step - joined[seq] + 1);
            }
        }
        println!("{precision:?}: batched against alone, max |Δlogit| = {worst:.2e}");

        // The long sequence taken out goes on alone as it would have in the batch.
        let row = seqs.iter().position(|&s| s == 2).unwrap();
        let out = batch.snapshot(row).unwrap();
        let next = batch.step(&mut dec, &tokens, &[]).unwrap().row(row).to_vec();
        dec.restore(&out).unwrap();
        let by_itself = dec.forward(&[tokens[row]], Logits::Last).unwrap().row(0).to_vec();
        let err = max_abs(&next, &by_itself);
        assert!(err <= TOL, "{precision:?}: a sequence out of the batch: max |Δlogit| {err:.3e} > {TOL:e}");
    }
}

#[test]
fn a_batch_refuses_what_does_not_fit_it() {
    let mut dec = Decoder::open(&open(&imported("gqa8", Precision::Fp32)), &SessionOptions::with_threads(2)).unwrap();
    let e = Batch::new(&dec, Vec::new(), 4).err().unwrap();
    assert!(e.to_string().contains("at least one sequence"), "{e}");
    dec.forward(&prompt(4, 0), Logits::Last).unwrap();
    let mut other = dec.snapshot().unwrap();
    other.model = "another model".into();
    let e = Batch::new(&dec, vec![dec.snapshot().unwrap(), other.clone()], 4).err().unwrap();
    assert!(e.to_string().contains("sequence 1 of the batch belongs to model another model"), "{e}");
    let mut batch = Batch::new(&dec, vec![dec.snapshot().unwrap()], 4).unwrap();
    let e = batch.join(&dec, other, 4).unwrap_err();
    assert!(e.to_string().contains("sequence 1 of the batch belongs to model another model"), "{e}");
    assert_eq!(batch.len(), 1, "a sequence refused leaves the batch as it was");
    let e = batch.step(&mut dec, &[1, 2], &[]).unwrap_err();
    assert!(e.to_string().contains("2 tokens for a batch of 1 sequences"), "{e}");
    assert!(batch.remove(3).unwrap_err().to_string().contains("no sequence 3"));
}
