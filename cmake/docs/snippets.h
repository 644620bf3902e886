// The registry of the documentation's snippets (cmake/GpipeDocs.cmake):
// every ```cpp block of README.md and docs/*.md is compiled into the program
// gpipe_docs_snippets and registers here under Page.Name; a block that is a
// program registers its main.
#pragma once

#include <string>
#include <vector>

namespace gpipe_docs {

struct Snippet {
  std::string name; // Page.Name
  int (*main)(); // a program's main; nullptr: compiled only
};

std::vector<Snippet>& snippets();

inline bool add(const char* name, int (*main)()) {
  snippets().push_back({name, main});
  return true;
}

} // namespace gpipe_docs

#define GPIPE_DOCS_CONCAT_(a, b) a##b
#define GPIPE_DOCS_CONCAT(a, b) GPIPE_DOCS_CONCAT_(a, b)
#define GPIPE_DOCS_REGISTER(name, main)                                      \
  static const bool GPIPE_DOCS_CONCAT(gpipe_docs_registered_, __COUNTER__) = \
      gpipe_docs::add(name, main);
