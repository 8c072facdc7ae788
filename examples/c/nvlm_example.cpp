// nvlm_example_cpp: the C API from C++ — RAII handles, a lambda as the token callback, and
// cancellation after a token budget.
//
//   nvlm_example_cpp BUNDLE IMAGE "What is in the picture?" [MAX_PIECES]
//
// Prints the answer as it streams; with MAX_PIECES, cancels after that many tokens.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "nvlm.h"

namespace {

// Each handle type owns its object through unique_ptr with the matching destroy function.
struct SessionClose { void operator()(nvlm_session* s) const { nvlm_session_close(s); } };
struct RequestDestroy { void operator()(nvlm_request* r) const { nvlm_request_destroy(r); } };
struct ResultDestroy { void operator()(nvlm_result* r) const { nvlm_result_destroy(r); } };
using Session = std::unique_ptr<nvlm_session, SessionClose>;
using Request = std::unique_ptr<nvlm_request, RequestDestroy>;
using Result = std::unique_ptr<nvlm_result, ResultDestroy>;

struct Error : std::runtime_error {
    int status;
    Error(int status, const std::string& message) : std::runtime_error(message), status(status) {}
};

void check(int status) {
    if (status != NVLM_OK) throw Error(status, nvlm_last_error());
}

// A C callback cannot capture; user_data carries the C++ callable.
template <typename OnPiece>
int trampoline(const char* piece, int32_t token_id, void* user_data) {
    return (*static_cast<OnPiece*>(user_data))(piece, token_id) ? 0 : 1;
}

std::vector<unsigned char> read_file(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw std::runtime_error("cannot read " + path);
    return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::cerr << "usage: nvlm_example_cpp BUNDLE IMAGE PROMPT [MAX_PIECES]\n";
        return 2;
    }
    const long max_pieces = argc > 4 ? std::stol(argv[4]) : -1;
    try {
        nvlm_session* raw_session = nullptr;
        check(nvlm_session_open(argv[1], "", &raw_session));
        Session session(raw_session);

        nvlm_request* raw_request = nullptr;
        check(nvlm_request_create(&raw_request));
        Request request(raw_request);
        check(nvlm_request_set_prompt(request.get(), argv[3]));
        const std::vector<unsigned char> image = read_file(argv[2]);
        check(nvlm_request_add_image_bytes(request.get(), image.data(), image.size()));

        long pieces = 0;
        auto on_piece = [&](const char* piece, int32_t) {
            std::cout << piece << std::flush;
            return max_pieces < 0 || ++pieces < max_pieces;  // false cancels
        };
        nvlm_result* raw_result = nullptr;
        const int status = nvlm_session_generate(session.get(), request.get(),
                                                 trampoline<decltype(on_piece)>, &on_piece,
                                                 &raw_result);
        Result result(raw_result);
        std::cout << '\n';
        if (status == NVLM_ERR_CANCELLED) {
            std::cerr << "cancelled after " << pieces << " tokens\n";
            return status;
        }
        check(status);
        std::cerr << "finish: " << nvlm_result_finish_reason(result.get()) << '\n';
    } catch (const Error& error) {
        std::cerr << "error (" << nvlm_status_name(error.status) << "): " << error.what() << '\n';
        return error.status;
    } catch (const std::exception& error) {
        std::cerr << "error: " << error.what() << '\n';
        return 1;
    }
    return 0;
}
