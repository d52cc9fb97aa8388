import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // Native addons and OpenMP thread pools are safer in child processes than in worker threads.
    pool: "forks",
    include: ["test/**/*.test.ts"],
    testTimeout: 120_000,
  },
});
