// Gaussian priors (paper, "Priors"): the isotropic N(mu, sigma^2 I), the fitted ("structured") N(mu, Sigma)
// with full covariance, and the Gaussian-exclusion prior built on either. The float64 linear algebra is
// native (kernels/cpu/prior_gaussian.cpp): the fit, x = mu + s L z, and Sigma^-1 (x - mu) by two triangular
// solves. Standard normals come from lib/rng.ts, so a draw depends on the seed only, not on the threads.
import { addon } from "./native.js";
import type { Prior, PriorRecord } from "./priors.js";
import type { Rng } from "./rng.js";
import { chiSquareLogSurvival } from "./stats.js";

const LOG_2PI = Math.log(2 * Math.PI);

/** n standard normals from `rng`, in draw order. */
export function standardNormals(n: number, rng: Rng): Float64Array {
  const z = new Float64Array(n);
  for (let i = 0; i < n; i++) z[i] = rng.normal();
  return z;
}

/** The value and gradient of a prior's energy: 0.5 * sum of squared Mahalanobis distances over the rows. */
export interface Energy {
  value: number;
  /** d energy / d x, rows x dim (null when not asked for). */
  gradient: Float32Array | null;
  /** Per row: the squared Mahalanobis distance (twice that row's energy). */
  mahalanobisSquared: Float64Array;
}

export function rowsOf(name: string, x: Float32Array, dim: number): number {
  if (!(x instanceof Float32Array))
    throw new TypeError(`${name}: expected a Float32Array, got ${x === null ? "null" : typeof x}`);
  if (x.length === 0 || x.length % dim !== 0)
    throw new RangeError(
      `${name}: expected a non-empty length that is a multiple of dim (${dim}), got ${x.length} elements`,
    );
  return x.length / dim;
}

export interface GaussianInit {
  kind: "gaussian" | "fitted-gaussian";
  dim: number;
  mean: Float64Array;
  /** Isotropic: Sigma = sigma^2 I (then cholesky and covariance are null). */
  sigma: number | null;
  cholesky: Float64Array | null;
  covariance: Float64Array | null;
  logDet: number;
  record: PriorRecord;
  stats?: Record<string, number>;
  threads: number;
}

/**
 * A full-covariance Gaussian fitted natively to `rows` (dim wide), regularised as `regularisation` says (see
 * prior.h): the one fit behind the fitted-gaussian prior and the analyses' per-dataset Gaussians.
 */
export async function fitGaussianPrior(
  rows: Float32Array,
  dim: number,
  regularisation: { shrinkage: number; ridgeAbsolute: number; ridgeRelative: number },
  threads: number,
  record: PriorRecord,
  stats: (fit: {
    ridge: number;
    meanVariance: number;
    covarianceSeconds: number;
    choleskySeconds: number;
  }) => Record<string, number>,
): Promise<GaussianPrior> {
  const fit = await addon().priorGaussianFit(rows, dim, { ...regularisation, keepCovariance: true }, threads);
  return new GaussianPrior({
    kind: "fitted-gaussian",
    dim,
    mean: fit.mean,
    sigma: null,
    cholesky: fit.cholesky,
    covariance: fit.covariance,
    logDet: fit.logDet,
    record,
    stats: stats(fit),
    threads,
  });
}

/**
 * N(mean, Sigma) in `dim` dimensions, isotropic (Sigma = sigma^2 I) or full (Sigma = L L^T). sample() draws
 * mean + L z row by row; logProb() is the exact log-density; energy() is 0.5 (x - mu)^T Sigma^-1 (x - mu) per
 * row, summed, with its gradient Sigma^-1 (x - mu): the prior-nll regulariser.
 */
export class GaussianPrior implements Prior {
  readonly kind: "gaussian" | "fitted-gaussian";
  readonly dim: number;
  readonly mean: Float64Array;
  readonly sigma: number | null;
  readonly cholesky: Float64Array | null;
  readonly logDet: number;
  readonly #covariance: Float64Array | null;
  readonly #record: PriorRecord;
  readonly #stats: Record<string, number>;
  readonly threads: number;

  constructor(init: GaussianInit) {
    this.kind = init.kind;
    this.dim = init.dim;
    this.mean = init.mean;
    this.sigma = init.sigma;
    this.cholesky = init.cholesky;
    this.#covariance = init.covariance;
    this.logDet = init.logDet;
    this.#record = init.record;
    this.#stats = init.stats ?? {};
    this.threads = init.threads;
  }

  /** The covariance, dim x dim row-major (a fresh matrix for the isotropic prior). */
  covariance(): Float64Array {
    if (this.#covariance) return this.#covariance;
    const d = this.dim;
    const out = new Float64Array(d * d);
    if (this.sigma !== null) {
      for (let i = 0; i < d; i++) out[i * d + i] = this.sigma * this.sigma;
      return out;
    }
    throw new Error("covariance: this Gaussian was built without its covariance matrix");
  }

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    return this.transform(standardNormals(n * this.dim, rng), 1);
  }

  /** mean + scale * L z for each row of z (rows x dim standard normals): draws from N(mean, scale^2 Sigma). */
  transform(z: Float64Array, scale: number): Float32Array {
    const d = this.dim;
    if (this.sigma !== null) {
      const out = new Float32Array(z.length);
      const s = scale * this.sigma;
      for (let i = 0; i < z.length; i++) out[i] = this.mean[i % d] + s * z[i];
      return out;
    }
    return addon().priorGaussianTransform(z, d, this.mean, this.cholesky!, scale, this.threads);
  }

  /** Per row: (x - mean)^T Sigma^-1 (x - mean). */
  mahalanobisSquared(x: Float32Array): Float64Array {
    return this.energy(x, false).mahalanobisSquared;
  }

  logProb(x: Float32Array): Float64Array {
    const r2 = this.mahalanobisSquared(x);
    const c = -0.5 * this.logDet - 0.5 * this.dim * LOG_2PI;
    return r2.map((v) => c - 0.5 * v);
  }

  energy(x: Float32Array, gradient: boolean): Energy {
    const d = this.dim;
    const n = rowsOf("x", x, d);
    if (this.sigma !== null) {
      const inv = 1 / (this.sigma * this.sigma);
      const r2 = new Float64Array(n);
      const grad = gradient ? new Float32Array(x.length) : null;
      for (let r = 0; r < n; r++) {
        let s = 0;
        for (let j = 0; j < d; j++) {
          const t = x[r * d + j] - this.mean[j];
          s += t * t;
          if (grad) grad[r * d + j] = t * inv;
        }
        r2[r] = s * inv;
      }
      return { value: 0.5 * sum(r2), gradient: grad, mahalanobisSquared: r2 };
    }
    const out = addon().priorGaussianEnergy(x, d, this.mean, this.cholesky!, gradient, this.threads);
    return {
      value: 0.5 * sum(out.mahalanobisSquared),
      gradient: out.gradient,
      mahalanobisSquared: out.mahalanobisSquared,
    };
  }

  describe(): PriorRecord {
    return structuredClone(this.#record);
  }

  stats(): Record<string, number> {
    return { ...this.#stats, logDet: this.logDet };
  }
}

export function checkCount(n: number): void {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`n: expected a positive integer, got ${n}`);
}

function sum(a: Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i];
  return s;
}

/**
 * The Gaussian-exclusion acceptance law (paper, "Priors"): fit N(mu, Sigma); draw x ~ N(mu, c_dim Sigma) with
 * c_dim = exp((2/d) ln c); accept with p = max(0, 1 - pdf(x) / pdf_wide(x)). With x = mu + sqrt(c_dim) L z,
 *   ln(pdf / pdf_wide) = (d/2) ln c_dim - (r^2 / 2)(1 - 1/c_dim) = ln c - (|z|^2 / 2)(c_dim - 1),
 * r^2 = c_dim |z|^2 the Mahalanobis distance under Sigma: the ratio depends on |z|^2 only, so rejected draws
 * never need L z. The accepted density is (pdf_wide - pdf)^+ / Z, zero on the ellipsoid r^2 <= r*^2, with
 *   r*^2 = 2 ln c / (1 - 1/c_dim)  (about d + ln c in high d: the thin shell the paper describes)
 *   Z = P(chi2_d > r*^2 / c_dim) - P(chi2_d > r*^2), the exact acceptance rate.
 */
export class ExclusionLaw {
  readonly c: number;
  readonly dim: number;
  readonly cDim: number;
  /** c_dim - 1, without cancellation. */
  readonly cDimMinusOne: number;
  /** r*^2: accepted points have a Mahalanobis distance (under Sigma) beyond this. */
  readonly thresholdMahalanobisSquared: number;
  readonly logAcceptanceRate: number;

  constructor(c: number, dim: number) {
    if (!(c > 1) || !Number.isFinite(c)) throw new RangeError(`c: expected a finite number > 1, got ${c}`);
    this.c = c;
    this.dim = dim;
    const e = (2 / dim) * Math.log(c);
    this.cDim = Math.exp(e);
    this.cDimMinusOne = Math.expm1(e);
    this.thresholdMahalanobisSquared = (2 * Math.log(c)) / -Math.expm1(-e);
    const a = chiSquareLogSurvival(this.thresholdMahalanobisSquared / this.cDim, dim);
    const b = chiSquareLogSurvival(this.thresholdMahalanobisSquared, dim);
    this.logAcceptanceRate = a + Math.log(-Math.expm1(b - a));
  }

  /** ln(pdf / pdf_wide) of a draw whose standard normals have squared norm zz = |z|^2. */
  logRatioOfDraw(zz: number): number {
    return Math.log(this.c) - 0.5 * zz * this.cDimMinusOne;
  }

  /** The acceptance probability max(0, 1 - pdf/pdf_wide) of a draw with |z|^2 = zz. */
  acceptance(zz: number): number {
    const l = this.logRatioOfDraw(zz);
    return l >= 0 ? 0 : -Math.expm1(l);
  }

  /** ln of the accepted density at a point with squared Mahalanobis distance r2 under Sigma = L L^T. */
  logDensity(r2: number, logDet: number): number {
    const logRatio = Math.log(this.c) - 0.5 * r2 * -Math.expm1(-(2 / this.dim) * Math.log(this.c));
    if (logRatio >= 0) return Number.NEGATIVE_INFINITY;
    const logWide =
      (-0.5 * r2) / this.cDim - 0.5 * (logDet + this.dim * Math.log(this.cDim)) - 0.5 * this.dim * LOG_2PI;
    return logWide + Math.log(-Math.expm1(logRatio)) - this.logAcceptanceRate;
  }
}

export interface ExclusionOptions {
  c: number;
  /** Draws allowed per requested sample, on average, before sample() gives up with an error. */
  maxTries: number;
  record: PriorRecord;
}

/** The Gaussian-exclusion prior: samples of N(mu, c_dim Sigma) accepted by ExclusionLaw. */
export class ExclusionPrior implements Prior {
  readonly kind = "exclusion";
  readonly dim: number;
  readonly base: GaussianPrior;
  readonly law: ExclusionLaw;
  readonly maxTries: number;
  readonly #record: PriorRecord;
  #tries = 0;
  #accepted = 0;

  constructor(base: GaussianPrior, options: ExclusionOptions) {
    this.base = base;
    this.dim = base.dim;
    this.law = new ExclusionLaw(options.c, base.dim);
    this.maxTries = options.maxTries;
    this.#record = options.record;
  }

  sample(n: number, rng: Rng): Float32Array {
    checkCount(n);
    const d = this.dim;
    const z = new Float64Array(n * d);
    const row = new Float64Array(d);
    const limit = this.maxTries * n;
    let accepted = 0;
    let tries = 0;
    while (accepted < n) {
      if (tries >= limit) {
        this.#tries += tries;
        this.#accepted += accepted;
        throw new Error(
          `exclusion prior: only ${accepted} of ${n} samples accepted after ${tries} draws (maxTries ${this.maxTries} ` +
            `per sample); the exact acceptance rate at c = ${this.law.c}, d = ${d} is ` +
            `${Math.exp(this.law.logAcceptanceRate).toExponential(3)}: raise maxTries or lower c`,
        );
      }
      tries++;
      let zz = 0;
      for (let j = 0; j < d; j++) {
        const v = rng.normal();
        row[j] = v;
        zz += v * v;
      }
      // One uniform per draw, accepted or not, so the stream of draws does not depend on the outcome.
      if (rng.uniform() < this.law.acceptance(zz)) z.set(row, d * accepted++);
    }
    this.#tries += tries;
    this.#accepted += accepted;
    return this.base.transform(z, Math.sqrt(this.law.cDim));
  }

  logProb(x: Float32Array): Float64Array {
    return this.base.mahalanobisSquared(x).map((r2) => this.law.logDensity(r2, this.base.logDet));
  }

  describe(): PriorRecord {
    return structuredClone(this.#record);
  }

  /** Draws and acceptances so far, the empirical and the exact acceptance rate, c_dim and r*^2. */
  stats(): Record<string, number> {
    return {
      tries: this.#tries,
      accepted: this.#accepted,
      acceptanceRate: this.#tries > 0 ? this.#accepted / this.#tries : Number.NaN,
      expectedAcceptanceRate: Math.exp(this.law.logAcceptanceRate),
      c: this.law.c,
      cDim: this.law.cDim,
      thresholdMahalanobisSquared: this.law.thresholdMahalanobisSquared,
    };
  }
}
