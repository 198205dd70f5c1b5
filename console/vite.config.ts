import { defineConfig } from "vite";

// The console is served by `openims serve` under /console/ and built into the binary
// (crates/console/build.rs). Preact's JSX is compiled by Vite's own esbuild step.
export default defineConfig({
  base: "/console/",
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: {
    outDir: "dist",
    target: "es2020",
    modulePreload: { polyfill: false },
    sourcemap: false,
    chunkSizeWarningLimit: 200,
  },
  server: {
    // `npm run dev` against a local `openims serve` on the default port.
    proxy: { "^/(v1|v1\\.0|v2|v2\\.1|v3)/": "http://127.0.0.1:9292" },
  },
});
