//! The tape against independent references: gradients of values used more than once are the sums
//! of their contributions (checked against f64 formulas and finite differences), branches that do
//! not reach the loss get nothing and never run backward, detached tensors and evaluation record
//! nothing, and a gradient shared by two values is never changed under one of them.

use int8_core::rng::CounterRng;
use int8_nn::layers::Conv2d;
use int8_nn::ops::relu;
use int8_nn::precision::{Int8Config, Precision};
use int8_nn::{ConvGeometry, Param, Tensor, no_grad};

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| rng.uniform(i as u64) * 2.0 - 1.0).collect()
}

fn tensor(v: Vec<f32>) -> Tensor {
    let n = v.len();
    Tensor::from_vec(v, n).unwrap()
}

fn dot(x: &Tensor, r: &Tensor) -> Tensor {
    x.mul(r).unwrap().sum_all().unwrap()
}

#[test]
fn a_value_used_by_several_ops_gets_the_sum_of_their_contributions() {
    let n = 1000;
    let (xv, a, b, c) = (uniform(n, 1), uniform(n, 2), uniform(n, 3), uniform(n, 4));
    let x = tensor(xv.clone()).requires_grad();
    let (at, bt, ct) = (tensor(a.clone()), tensor(b.clone()), tensor(c.clone()));
    // A leaf used three times: loss = <x, a> + <relu(x), b> + <x * x, c>.
    let loss = dot(&x, &at).add(&dot(&relu(&x).unwrap(), &bt)).unwrap().add(&dot(&x.mul(&x).unwrap(), &ct)).unwrap();
    let g = loss.backward().unwrap().get(&x).unwrap().to_vec();
    for i in 0..n {
        let x = xv[i] as f64;
        let want = a[i] as f64 + if x > 0.0 { b[i] as f64 } else { 0.0 } + 2.0 * x * c[i] as f64;
        assert!((g[i] as f64 - want).abs() < 1e-5, "x[{i}]: {} vs {want}", g[i]);
    }
    // A value made inside the graph and used twice: h = x * a; loss = <h, b> + <relu(h), c>.
    let h = x.mul(&at).unwrap();
    let loss = dot(&h, &bt).add(&dot(&relu(&h).unwrap(), &ct)).unwrap();
    let g = loss.backward().unwrap().get(&x).unwrap().to_vec();
    for i in 0..n {
        let h = xv[i] as f64 * a[i] as f64;
        let want = a[i] as f64 * (b[i] as f64 + if h > 0.0 { c[i] as f64 } else { 0.0 });
        assert!((g[i] as f64 - want).abs() < 1e-5, "h[{i}]: {} vs {want}", g[i]);
    }
}

#[test]
fn a_gradient_shared_by_two_values_is_not_changed_under_either() {
    // An add hands one gradient tensor to both operands; a's gradient then gets a second
    // contribution, which must not reach b's.
    let n = 70_000;
    let (a, b) = (tensor(uniform(n, 5)).requires_grad(), tensor(uniform(n, 6)).requires_grad());
    let (r, c) = (uniform(n, 7), uniform(n, 8));
    let loss = dot(&a.add(&b).unwrap(), &tensor(r.clone()));
    let loss = loss.add(&dot(&a, &tensor(c.clone()))).unwrap();
    let g = loss.backward().unwrap();
    let (ga, gb) = (g.get(&a).unwrap().to_vec(), g.get(&b).unwrap().to_vec());
    for i in 0..n {
        assert_eq!(ga[i], r[i] + c[i], "a[{i}]");
        assert_eq!(gb[i], r[i], "b[{i}]");
    }
}

#[test]
fn a_branch_that_does_not_reach_the_loss_gets_no_gradient_and_never_runs_backward() {
    let g = ConvGeometry { padding: (1, 1), ..Default::default() };
    let int8 = Precision::Int8(Int8Config::default());
    let w = |seed| Tensor::from_vec(uniform(4 * 4 * 9, seed), (4, 4, 3, 3)).unwrap();
    let (live, dead) = (Conv2d::new("live", w(1), g, int8).unwrap(), Conv2d::new("dead", w(2), g, int8).unwrap());
    let shared = Param::new("shared", Tensor::from_vec(uniform(4 * 6 * 6, 3), (1, 4, 6, 6)).unwrap(), false);
    let x = shared.value();
    let y = live.forward(&x).unwrap();
    let unused = dead.forward(&x).unwrap();
    let r = Tensor::from_vec(uniform(y.elem_count(), 4), y.dims()).unwrap();
    let grads = dot(&y, &r).backward().unwrap();
    assert!(grads.of(live.weight()).is_some());
    assert!(grads.of(dead.weight()).is_none(), "the dead branch's weight gets no gradient");
    assert_eq!(grads.len(), 2, "the live weight and the shared input, nothing else");
    // The shared input gets the live branch's contribution alone: the same as without the dead
    // branch at all.
    let alone = {
        let live2 = Conv2d::new("live", w(1), g, Precision::Int8(Int8Config::default())).unwrap();
        let y = live2.forward(&shared.value()).unwrap();
        dot(&y, &r).backward().unwrap().of(&shared).unwrap().to_vec()
    };
    assert_eq!(grads.of(&shared).unwrap().to_vec(), alone);
    // The dead INT8 layer never quantized a gradient: its backward pass never ran.
    assert_eq!((live.quant().stats().steps, dead.quant().stats().steps), (1, 0));
    drop(unused);
}

#[test]
fn detached_tensors_and_evaluation_record_nothing() {
    let p = Param::new("p", tensor(uniform(10, 9)), true);
    let r = tensor(uniform(10, 10));
    // Detached: the loss depends on no recorded op.
    let err = dot(&p.value().detach(), &r).backward().unwrap_err().to_string();
    assert!(err.contains("not recorded"), "{err}");
    // Mixed: only the live path carries a gradient.
    let loss = dot(&p.value().detach(), &r).add(&dot(&p.value(), &r.scale(2.0).unwrap())).unwrap();
    let g = loss.backward().unwrap().of(&p).unwrap().to_vec();
    assert_eq!(g, r.scale(2.0).unwrap().to_vec());
    // Inside no_grad nothing is tracked, and the setting is restored after.
    let y = no_grad(|| dot(&p.value(), &r));
    assert!(!y.is_tracked());
    assert!(y.backward().is_err());
    assert!(dot(&p.value(), &r).is_tracked());
    // Restored after a panic too.
    let caught = std::panic::catch_unwind(|| no_grad(|| panic!("inside")));
    assert!(caught.is_err());
    assert!(int8_nn::tape::is_recording());
}

#[test]
fn a_graph_runs_backward_once() {
    let x = tensor(uniform(5, 11)).requires_grad();
    let loss = dot(&relu(&x).unwrap(), &tensor(uniform(5, 12)));
    loss.backward().unwrap();
    let err = loss.backward().unwrap_err().to_string();
    assert!(err.contains("backward once") && err.contains("run the forward pass again"), "{err}");
    // A loss must be one value.
    let err = x.mul(&x).unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("single value"), "{err}");
}

#[test]
fn gradients_match_finite_differences_through_reshape_and_scale() {
    let xv = uniform(24, 13);
    let r = Tensor::from_vec(uniform(24, 14), (4, 6)).unwrap();
    let f = |x: &Tensor| dot(&x.reshape((4, 6)).unwrap().scale(1.5).unwrap(), &r);
    let x = Tensor::from_vec(xv.clone(), (2, 3, 4)).unwrap().requires_grad();
    let g = f(&x).backward().unwrap().get(&x).unwrap().to_vec();
    assert_eq!(g.len(), 24);
    for i in 0..24 {
        let at = |d: f32| {
            let mut v = xv.clone();
            v[i] += d;
            f(&Tensor::from_vec(v, (2, 3, 4)).unwrap()).to_scalar().unwrap() as f64
        };
        let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
        assert!((fd - g[i] as f64).abs() < 1e-3, "[{i}]: {fd} vs {}", g[i]);
    }
    assert!(x.reshape((5, 5)).is_err());
}
