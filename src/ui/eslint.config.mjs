// ESLint's configuration for the browser page's script, src/ui/page.js (scripts/check-ui runs
// it with a pinned ESLint). It imports nothing, so it loads without a node_modules beside it:
// ESLint's recommended rules (as of ESLint 10) are written out, with a few more on top.

const recommended = [
  "constructor-super", "for-direction", "getter-return", "no-async-promise-executor",
  "no-case-declarations", "no-class-assign", "no-compare-neg-zero", "no-cond-assign",
  "no-const-assign", "no-constant-binary-expression", "no-constant-condition", "no-control-regex",
  "no-debugger", "no-delete-var", "no-dupe-args", "no-dupe-class-members", "no-dupe-else-if",
  "no-dupe-keys", "no-duplicate-case", "no-empty", "no-empty-character-class", "no-empty-pattern",
  "no-empty-static-block", "no-ex-assign", "no-extra-boolean-cast", "no-fallthrough",
  "no-func-assign", "no-global-assign", "no-import-assign", "no-invalid-regexp",
  "no-irregular-whitespace", "no-loss-of-precision", "no-misleading-character-class",
  "no-new-native-nonconstructor", "no-nonoctal-decimal-escape", "no-obj-calls", "no-octal",
  "no-prototype-builtins", "no-redeclare", "no-regex-spaces", "no-self-assign", "no-setter-return",
  "no-shadow-restricted-names", "no-sparse-arrays", "no-this-before-super", "no-unassigned-vars",
  "no-undef", "no-unexpected-multiline", "no-unreachable", "no-unsafe-finally",
  "no-unsafe-negation", "no-unsafe-optional-chaining", "no-unused-labels",
  "no-unused-private-class-members", "no-unused-vars", "no-useless-assignment",
  "no-useless-backreference", "no-useless-catch", "no-useless-escape", "no-with",
  "preserve-caught-error", "require-yield", "use-isnan", "valid-typeof",
];

export default [
  {
    files: ["**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "script",
      // Exactly the browser globals the page uses: anything else is a typo or a new dependency.
      globals: Object.fromEntries([
        "window", "document", "WebSocket", "performance", "URL", "URLSearchParams", "TextEncoder",
        "setInterval", "clearInterval", "setTimeout", "clearTimeout",
      ].map((name) => [name, "readonly"])),
    },
    linterOptions: { reportUnusedDisableDirectives: "error" },
    rules: {
      ...Object.fromEntries(recommended.map((rule) => [rule, "error"])),
      strict: ["error", "global"],
      eqeqeq: "error",
      curly: "error",
      "no-var": "error",
      "prefer-const": "error",
      "no-shadow": "error",
      "no-implicit-globals": "error",
      // The page runs under a Content-Security-Policy without 'unsafe-eval'.
      "no-eval": "error",
      "no-implied-eval": "error",
      "no-new-func": "error",
      // Text from the server (close reasons, its name) goes in as text, never as markup.
      "no-restricted-properties": ["error",
        { property: "innerHTML", message: "use textContent or DOM nodes" },
        { property: "outerHTML", message: "use textContent or DOM nodes" },
        { property: "insertAdjacentHTML", message: "use DOM nodes" },
        { object: "document", property: "write", message: "use DOM nodes" },
      ],
    },
  },
];
