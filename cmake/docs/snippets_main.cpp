// gpipe_docs_snippets: the documentation's code (cmake/GpipeDocs.cmake).
//   gpipe_docs_snippets --list         every snippet compiled in, one a line
//   gpipe_docs_snippets Page.Name      runs that program; its exit status
//   gpipe_docs_snippets --skip REASON  prints the reason, exits 77 (skipped)
#include <exception>
#include <iostream>
#include <string>

#include "snippets.h"

namespace gpipe_docs {
std::vector<Snippet>& snippets() {
  static std::vector<Snippet> all;
  return all;
}
} // namespace gpipe_docs

int main(int argc, char** argv) {
  const std::string usage =
      "usage: gpipe_docs_snippets --list | Page.Name | --skip REASON";
  if (argc != 2 && !(argc == 3 && std::string(argv[1]) == "--skip")) {
    std::cerr << usage << "\n";
    return 2;
  }
  const std::string what = argv[1];
  if (what == "--skip") {
    std::cout << "SKIP: " << argv[2] << "\n";
    return 77;
  }
  if (what == "--list") {
    for (const auto& snippet : gpipe_docs::snippets()) {
      std::cout << snippet.name << "\n";
    }
    return 0;
  }
  for (const auto& snippet : gpipe_docs::snippets()) {
    if (snippet.name != what) {
      continue;
    }
    if (snippet.main == nullptr) {
      std::cerr << what
                << " is compiled only: it is not a program (no int main())\n";
      return 2;
    }
    try {
      return snippet.main();
    } catch (const std::exception& e) {
      std::cerr << what << " threw: " << e.what() << "\n";
      return 1;
    }
  }
  std::cerr << "no snippet named " << what << " (--list lists them)\n";
  return 2;
}
