# Patches applied to llama-cpp-sys-2's vendored llama.cpp while it builds, as Ollama carries its
# own llama.cpp patches. llama-cpp-sys-2 hands every CMAKE_* environment variable to CMake as -D,
# and .cargo/config.toml sets CMAKE_PROJECT_INCLUDE to this file, so it runs after llama.cpp's
# project() call. The crate's sources in the Cargo registry stay untouched: each patched file is
# written to the build folder and swapped into its target's source list.
#
# A patch whose text is no longer found stops the build: a llama.cpp upgrade must look at it again.
include_guard(GLOBAL)

# target, source path relative to llama.cpp, text to find, replacement
function(llama_agent_patch target rel old new)
    set(src "${CMAKE_SOURCE_DIR}/${rel}")
    set(out "${CMAKE_BINARY_DIR}/llama-agent-patched/${rel}")
    # A second patch of one file goes on top of the first (already in the target's sources).
    get_property(done GLOBAL PROPERTY llama_agent_patched)
    list(FIND done "${rel}" again)
    if(again EQUAL -1)
        file(READ "${src}" text)
    else()
        file(READ "${out}" text)
    endif()
    string(FIND "${text}" "${old}" at)
    if(at EQUAL -1)
        message(FATAL_ERROR "llama-agent patch for ${rel} no longer applies: '${old}' not found")
    endif()
    string(REPLACE "${old}" "${new}" text "${text}")
    # The copy sits in a folder of its own; its quoted includes resolve through the target's
    # include directories, which list the original folder.
    set(current "")
    if(EXISTS "${out}")
        file(READ "${out}" current)
    endif()
    if(NOT current STREQUAL text)
        file(WRITE "${out}" "${text}")
    endif()
    if(NOT again EQUAL -1)
        message(STATUS "llama-agent patch applied: ${rel}")
        return()
    endif()
    set_property(GLOBAL APPEND PROPERTY llama_agent_patched "${rel}")
    get_target_property(sources ${target} SOURCES)
    get_filename_component(name "${rel}" NAME)
    list(FIND sources "${name}" index)
    if(index EQUAL -1)
        message(FATAL_ERROR "llama-agent patch: ${name} is not a source of ${target}")
    endif()
    list(REMOVE_AT sources ${index})
    list(INSERT sources ${index} "${out}")
    set_target_properties(${target} PROPERTIES SOURCES "${sources}")
    message(STATUS "llama-agent patch applied: ${rel}")
endfunction()

function(llama_agent_apply_patches)
    # An embedding context never reads logits, yet llama.cpp reserves a logits buffer and copies
    # the LM head's output for every token to it: for a Qwen3-Embedding-shaped model that is
    # 151,936 floats per token, 300 MB per 500-token batch, most of each batch's time on a GPU.
    # Older llama.cpp had exactly this line; without a buffer the copy is skipped.
    llama_agent_patch(llama src/llama-context.cpp
        "bool has_logits     = true;"
        "bool has_logits     = !cparams.embeddings;")
    # An embedding context outputs every token, so a causal decoder pooled on its last token
    # still finished the last layer for every token and copied all of their vectors to the
    # host. With llama.cpp's pooling off (ours pools), the batch's own output flags are kept:
    # the embedder marks only the rows its pooling reads.
    llama_agent_patch(llama src/llama-context.cpp
        "const bool output_all   = cparams.embeddings;"
        "const bool output_all   = cparams.embeddings && cparams.pooling_type != LLAMA_POOLING_TYPE_NONE;")
    # That buffer gone, the LM head itself was still computed: a tokens x vocabulary matrix
    # product that no embedding reads, about a quarter of a Qwen3-Embedding-0.6B batch's
    # arithmetic, and its tokens x vocabulary result held in the compute buffer. The graph is
    # rebuilt without the nodes only the logits need: the others are expanded again in their
    # own order, so KV writes still come before the attention that reads them, and keep their
    # compute flags.
    llama_agent_patch(llama src/llama-model.cpp
        [=[    llm->res->set_outputs(params);

    return llm->res->get_gf();]=]
        [=[    llm->res->set_outputs(params);

    if (params.cparams.embeddings && llm->res->t_logits != nullptr) {
        ggml_cgraph * gf = llm->res->get_gf();
        const int n_nodes = ggml_graph_n_nodes(gf);
        std::vector<const ggml_tensor *> used;
        for (int i = 0; i < n_nodes; ++i) {
            const ggml_tensor * node = ggml_graph_node(gf, i);
            for (int s = 0; s < GGML_MAX_SRC; ++s) {
                if (node->src[s] != nullptr) {
                    used.push_back(node->src[s]);
                }
            }
        }
        std::sort(used.begin(), used.end());
        // Nodes come in dependency order: walking back, a node is kept when it is a sink or
        // an output other than the logits, or a source of a kept node.
        std::map<const ggml_tensor *, bool> needed;
        std::vector<ggml_tensor *> keep;
        for (int i = n_nodes - 1; i >= 0; --i) {
            ggml_tensor * node = ggml_graph_node(gf, i);
            const bool is_used = std::binary_search(used.begin(), used.end(), node);
            const bool root = node != llm->res->t_logits &&
                (!is_used || (node->flags & GGML_TENSOR_FLAG_OUTPUT));
            if (root || needed.count(node) != 0) {
                keep.push_back(node);
                for (int s = 0; s < GGML_MAX_SRC; ++s) {
                    if (node->src[s] != nullptr) {
                        needed[node->src[s]] = true;
                    }
                }
                if (node->view_src != nullptr) {
                    needed[node->view_src] = true;
                }
            }
        }
        // Expanding sets every node's compute flag; the branches ggml_build_forward_select
        // left uncomputed (token ids or embeddings as input) must stay so.
        std::vector<bool> compute;
        for (const ggml_tensor * node : keep) {
            compute.push_back((node->flags & GGML_TENSOR_FLAG_COMPUTE) != 0);
        }
        ggml_graph_clear(gf);
        for (auto it = keep.rbegin(); it != keep.rend(); ++it) {
            ggml_build_forward_expand(gf, *it);
        }
        for (size_t k = 0; k < keep.size(); ++k) {
            if (!compute[k]) {
                keep[k]->flags &= ~GGML_TENSOR_FLAG_COMPUTE;
            }
        }
        llm->res->t_logits = nullptr;
    }

    return llm->res->get_gf();]=])
    # A grammar that does not parse is reported on stderr only, with the whole grammar after it;
    # the log callback carries the reason to the request that sent the grammar instead.
    llama_agent_patch(llama src/llama-grammar.cpp
        [=[fprintf(stderr, "%s: error parsing grammar: %s\n\n%s\n", __func__, err.what(), src);]=]
        [=[LLAMA_LOG_ERROR("%s: error parsing grammar: %s\n", __func__, err.what());]=])
endfunction()

# Runs when llama.cpp's top-level CMakeLists.txt is done, so the targets exist.
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL llama_agent_apply_patches)
