// Small statistics helpers for the collapse metrics: a seeded generator, sampling without replacement,
// percentile ranks, quantiles, the chi-square tail and the effective rank of a spectrum; and row stacking.

/** mulberry32: a fast seeded 32-bit generator; returns numbers in [0, 1). */
export function seededRandom(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** m distinct integers from [0, n), in random order (partial Fisher-Yates), reproducible from the seed. */
export function sampleWithoutReplacement(n: number, m: number, seed: number): Int32Array {
  const count = Math.min(n, m);
  const pool = new Int32Array(n);
  for (let i = 0; i < n; i++) pool[i] = i;
  const random = seededRandom(seed);
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(random() * (n - i));
    const t = pool[i];
    pool[i] = pool[j];
    pool[j] = t;
  }
  return pool.slice(0, count);
}

/**
 * Percentile rank (0..100) of `value` within ascending `sorted`: 100 * (below + equal / 2) / n, the mid-rank
 * convention, so a value equal to every sample ranks 50 and the ranks of a sample's own elements average 50.
 */
export function percentileRank(sorted: Float64Array, value: number): number {
  const n = sorted.length;
  if (n === 0) return Number.NaN;
  let lo = 0;
  let hi = n;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  const below = lo;
  hi = n;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] <= value) lo = mid + 1;
    else hi = mid;
  }
  return (100 * (below + (lo - below) / 2)) / n;
}

/** Quantile q (0..1) of ascending `sorted`, linear interpolation between order statistics (numpy's default). */
export function quantile(sorted: Float64Array, q: number): number {
  const n = sorted.length;
  if (n === 0) return Number.NaN;
  const pos = q * (n - 1);
  const i = Math.floor(pos);
  const f = pos - i;
  return i + 1 < n ? sorted[i] * (1 - f) + sorted[i + 1] * f : sorted[n - 1];
}

const LANCZOS = [
  0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059,
  12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7,
];

/** ln Gamma(x) for x > 0 (Lanczos, g = 7; relative error about 1e-15). */
export function logGamma(x: number): number {
  if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - logGamma(1 - x);
  const z = x - 1;
  let a = LANCZOS[0];
  const t = z + 7.5;
  for (let i = 1; i < 9; i++) a += LANCZOS[i] / (z + i);
  return 0.5 * Math.log(2 * Math.PI) + (z + 0.5) * Math.log(t) - t + Math.log(a);
}

/**
 * ln Q(a, x), the log of the regularised upper incomplete gamma function, for a > 0, x >= 0. Series for
 * P(a, x) when x < a + 1 (then Q = 1 - P has no cancellation: P <= ~0.6 there), Lentz's continued fraction
 * for Q otherwise (Numerical Recipes, 3rd ed., section 6.2). Computed in logs so tails far below 1e-308
 * stay finite.
 */
export function logUpperGammaRegularized(a: number, x: number): number {
  if (x <= 0) return 0;
  const logPrefix = -x + a * Math.log(x) - logGamma(a);
  if (x < a + 1) {
    let term = 1 / a;
    let sum = term;
    for (let n = 1; n < 100000; n++) {
      term *= x / (a + n);
      sum += term;
      if (term < sum * 1e-17) break;
    }
    return Math.log1p(-Math.exp(logPrefix + Math.log(sum)));
  }
  const tiny = 1e-300;
  let b = x + 1 - a;
  let c = 1 / tiny;
  let d = 1 / b;
  let h = d;
  for (let i = 1; i < 100000; i++) {
    const an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (Math.abs(d) < tiny) d = tiny;
    c = b + an / c;
    if (Math.abs(c) < tiny) c = tiny;
    d = 1 / d;
    const delta = d * c;
    h *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  return logPrefix + Math.log(h);
}

/** ln P(X > x) for X ~ chi-square with `dof` degrees of freedom. */
export function chiSquareLogSurvival(x: number, dof: number): number {
  return logUpperGammaRegularized(dof / 2, x / 2);
}

/**
 * Effective rank at `energy` (e.g. 0.95) of a matrix with the given squared singular values (eigenvalues of
 * its Gram matrix, any order): the fewest components whose energy sum reaches that share of the total.
 */
export function effectiveRank(squaredSingularValues: ArrayLike<number>, energy: number): number {
  const values = Array.from(squaredSingularValues, (v) => Math.max(0, v)).sort((a, b) => b - a);
  const total = values.reduce((s, v) => s + v, 0);
  if (total === 0) return 0;
  let acc = 0;
  for (let i = 0; i < values.length; i++) {
    acc += values[i];
    // A relative slack of 1e-12 keeps an exact 95% (e.g. 19 equal values of 20) from failing on rounding.
    if (acc >= energy * total * (1 - 1e-12)) return i + 1;
  }
  return values.length;
}

/** Row blocks stacked into one array (the blocks' lengths summed). */
export function concatRows(parts: Float32Array[]): Float32Array {
  const out = new Float32Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}
